"""Padding-free packed batches: attention that stays inside each example of a packed row.

`batching.pack` lays a batch out as one row of all examples end to end, with position ids restarting at 0 for
each example and the example boundaries in `cu_seqlens`. Run through a decoder as is, plain causal attention
would let an example see the ones before it; the attention implementation registered here (`fl_packed`) keeps
each example to itself, with one of three kernels:

- `varlen`: `torch.nn.attention.varlen.varlen_attn` (flash-attention's variable-length kernel, in PyTorch since
  2.10; CUDA, bf16/fp16): no mask at all, no padding, no compilation. The default on CUDA.
- `flex`: `flex_attention` with a document-causal `BlockMask`, compiled (uncompiled it materialises the scores).
- `sdpa`: `scaled_dot_product_attention` with a dense T × T document-causal boolean mask: exact, O(T²) memory;
  the reference, and the path on the CPU (tests).

The decoder is told about the packing through a keyword argument (`fl_packing`) that transformers passes from
the model's forward to every attention call, so gradient checkpointing's recomputation sees it too.
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache

import torch

PACKED = "fl_packed"
BACKENDS = ("varlen", "flex", "sdpa")


@dataclass
class PackInfo:
    cu_seqlens: torch.Tensor  # int32, (examples + 1,), on the device
    max_length: int
    backend: str
    mask: object = None  # sdpa: (1, 1, T, T) bool; flex: a BlockMask


@cache
def _varlen():
    """varlen_attn and the keyword names this torch version takes (its signature changed between releases)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, frozenset()
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


@cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


@cache
def varlen_works(device: torch.device) -> bool:
    """One tiny forward and backward of varlen_attn (2 examples, GQA) against sdpa run per example: the kernel
    exists in this torch build, takes these arguments, and computes causal attention. Checked once per device."""
    if _varlen()[0] is None:
        return False
    try:
        generator = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(1, heads, 24, 64, device=device, dtype=torch.bfloat16, generator=generator)
                   .requires_grad_() for heads in (4, 2, 2))
        cu = torch.tensor([0, 10, 24], dtype=torch.int32, device=device)
        out = _varlen_attention(q, k, v, PackInfo(cu, 14, "varlen"), 0.125)[0]  # (T, heads, D)
        out.float().sum().backward()
        for a, b in ((0, 10), (10, 24)):
            ref = torch.nn.functional.scaled_dot_product_attention(
                q[:, :, a:b], _repeat_kv(k[:, :, a:b], 2, 1), _repeat_kv(v[:, :, a:b], 2, 1), is_causal=True,
                scale=0.125)[0].transpose(0, 1)
            if float((out[a:b].float() - ref.float()).abs().max()) > 2e-2:
                return False
        return bool(torch.isfinite(q.grad).all())
    except Exception as error:  # noqa: BLE001 - any failure means: use another kernel
        import logging

        logging.getLogger(__name__).warning("varlen_attn unusable here (%s); packed attention uses flex", error)
        return False


def default_backend(device: torch.device) -> str:
    if device.type == "cuda":
        return "varlen" if varlen_works(device) else "flex"
    return "sdpa"


def _repeat_kv(x: torch.Tensor, groups: int, dim: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=dim)


def _varlen_attention(query, key, value, info: PackInfo, scaling):
    varlen_attn, params = _varlen()
    dtype = query.dtype if query.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    q, k, v = (x[0].transpose(0, 1).to(dtype).contiguous() for x in (query, key, value))  # (T, heads, D)
    kwargs = {}
    if "scale" in params:
        kwargs["scale"] = scaling
    if "is_causal" in params:
        kwargs["is_causal"] = True
    else:
        kwargs["window_size"] = (-1, 0)  # causal
    groups = q.shape[1] // k.shape[1]
    if groups > 1 and "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    else:
        k, v = _repeat_kv(k, groups, 1), _repeat_kv(v, groups, 1)
    cu = info.cu_seqlens
    out = varlen_attn(q, k, v, cu, cu, info.max_length, info.max_length, **kwargs)
    return out.unsqueeze(0).to(query.dtype)  # (1, T, heads, D)


def _flex_attention(query, key, value, info: PackInfo, scaling):
    flex = _compiled_flex() if query.device.type == "cuda" else __import__(
        "torch.nn.attention.flex_attention", fromlist=["flex_attention"]).flex_attention
    groups = query.shape[1] // key.shape[1]
    out = flex(query, key, value, block_mask=info.mask, scale=scaling, enable_gqa=groups > 1)
    return out.transpose(1, 2)


def _sdpa_attention(query, key, value, info: PackInfo, scaling):
    groups = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, groups, 1), _repeat_kv(value, groups, 1)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=info.mask, scale=scaling)
    return out.transpose(1, 2)


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention interface: (B, heads, T, D) in, ((B, T, heads, D), None) out."""
    info: PackInfo | None = kwargs.get("fl_packing")
    if info is None:  # an ordinary (unpacked) call while packing is switched on: plain sdpa
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if dropout:
        raise ValueError("packed attention has no attention dropout")
    run = {"varlen": _varlen_attention, "flex": _flex_attention, "sdpa": _sdpa_attention}[info.backend]
    return run(query, key, value, info, scaling), None


def _document_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths, output_size=total)


def pack_info(batch: dict, backend: str) -> PackInfo:
    total = batch["input_ids"].shape[1]
    info = PackInfo(cu_seqlens=batch["cu_seqlens"], max_length=int(batch["max_length"]), backend=backend)
    if backend == "sdpa":
        doc = _document_ids(batch["cu_seqlens"], total)
        causal = torch.ones(total, total, dtype=torch.bool, device=doc.device).tril_()
        info.mask = ((doc[:, None] == doc[None, :]) & causal)[None, None]
    elif backend == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        doc = _document_ids(batch["cu_seqlens"], total)

        def document_causal(b, h, q_idx, kv_idx):
            return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

        info.mask = create_block_mask(document_causal, None, None, total, total, device=doc.device)
    return info


def packed_forward(decoder, batch: dict, backend: str | None = None) -> torch.Tensor:
    """Last hidden states (T, hidden) of a packed batch; needs `packed_attention_enabled` around the fit."""
    config = decoder.config
    if config._attn_implementation != PACKED:
        raise RuntimeError("a packed batch needs the packed attention implementation: run it inside "
                           "`packed_attention_enabled(model)`")
    info = pack_info(batch, backend or default_backend(batch["input_ids"].device))
    hidden = decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"], fl_packing=info)
    return hidden.last_hidden_state[0]


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED, packed_attention)
    # No mask function is registered on purpose: transformers then builds no 4D mask and does not inspect the
    # position ids for packing (which would read a device value back to the host on every step).


@contextmanager
def packed_attention_enabled(model, enabled: bool = True):
    """Switch the model to `fl_packed` attention for one fit; put back on exit (evaluation sees the model as
    loaded). Unpacked calls meanwhile run as plain sdpa."""
    if not enabled:
        yield
        return
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    configs = {id(c): c for c in (causal_lm.config, causal_lm.get_decoder().config)}.values()
    _register()
    saved = [(c, c._attn_implementation) for c in configs]
    try:
        for c in configs:
            c._attn_implementation = PACKED
        yield
    finally:
        for c, name in saved:
            c._attn_implementation = name
