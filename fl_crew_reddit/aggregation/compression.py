"""Compressed client updates (UPDATE_COMPRESSION): pure math on the update (sent − global), no I/O.

A client compresses its update Δ = trained − global into a *payload*: a flat dict of tensors only, so it travels
unchanged through the safetensors files of the in-process engines and Flower's `pack_adapter`. For every adapter key
K the payload holds:

    fp16   K::fp16                    Δ in half precision (same shape)                       16 bits / value
    int8   K::int8, K::scale          symmetric int8 codes of Δ flattened, in blocks of       8.5 bits / value
                                      BLOCK values, one float32 absmax/127 per block
    nf4    K::nf4, K::absmax          4-bit NormalFloat codes (QLoRA's codebook, Dettmers    4.5 bits / value
                                      2023) per block of BLOCK values scaled by its float32
                                      absmax, two codes per uint8 (first in the high nibble)
    topk   K::index, K::value         the k = ceil(TOPK_FRACTION · n) entries of Δ largest    48 bits / kept value
                                      in magnitude: ascending int32 positions (int64 past
                                      2³¹ values) and float16 values (float32 if one does not fit)
    sign   K::sign, K::scale          one bit per value (1: ≥ 0), eight per uint8 (first in   1.5 bits / value
                                      the high bit), times the float32 mean |Δ| of its block
                                      of BLOCK values (the L2-best scale for signs)

`decompress` turns a payload back into Δ (float32, the reference's shapes) and trusts nothing: wrong or missing
keys, wrong dtypes or shapes, codes or indices out of range, repeated or unsorted indices, a k other than the agreed
one, non-finite values: each is a ValueError naming the key and what is wrong, so the server rejects that client
instead of aggregating a silently wrong model.

Error feedback for top-k and sign (Stich et al. 2018; Karimireddy et al. 2019, "EF-SGD" / EF-signSGD): what the
compression drops is not lost, the client keeps it as a residual and adds it to its next update before compressing
(`compress_with_feedback`). Then the sum of what a client sent over rounds differs from the sum of its true updates
by exactly its current residual, which stays bounded, instead of growing with every round.

Why sign: a LoRA update after a few Adam steps has nearly equal magnitudes everywhere (Adam moves every coordinate
by about the learning rate per step), so top-k keeps little of it (5% of the values held 7.5% of the energy on the
embedded model), while sign × block scale keeps its direction (docs/aggregation.md).
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

COMPRESSIONS = ("none", "fp16", "int8", "nf4", "topk", "sign")
KINDS = COMPRESSIONS[1:]  # the kinds that make a payload
ERROR_FEEDBACK_KINDS = ("topk", "sign")
BLOCK = 64  # values per int8 / nf4 quantization block (bitsandbytes' smallest blockwise size)
FP16_MAX = 65504.0
# The 16 NormalFloat-4 levels of QLoRA (bitsandbytes' NF4 table): quantiles of N(0, 1) scaled to [-1, 1], with 0 exact.
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)
SUFFIXES = {"fp16": ("fp16",), "int8": ("int8", "scale"), "nf4": ("nf4", "absmax"), "topk": ("index", "value"),
            "sign": ("sign", "scale")}
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
SEP = "::"


def topk_count(numel: int, fraction: float) -> int:
    """k of a tensor of `numel` values: ceil(fraction · numel), at least 1, at most numel."""
    if not 0 < fraction <= 1:
        raise ValueError(f"TOPK_FRACTION must be in (0, 1], got {fraction}")
    return min(numel, max(1, math.ceil(fraction * numel))) if numel else 0


def _blocks(flat: Tensor) -> Tensor:
    """`flat` zero-padded to whole blocks, as (blocks, BLOCK)."""
    pad = (-flat.numel()) % BLOCK
    return torch.nn.functional.pad(flat, (0, pad)).reshape(-1, BLOCK)


def _num_blocks(numel: int) -> int:
    return (numel + BLOCK - 1) // BLOCK


# --- compress ------------------------------------------------------------------------------------------------------
def compress(update: Mapping[str, Tensor], kind: str, *, topk_fraction: float = 0.05) -> dict[str, Tensor]:
    """The payload of `update` ({key: Δ}) for `kind` (one of KINDS); deterministic (no random rounding)."""
    if kind not in KINDS:
        raise ValueError(f"unknown compression {kind!r}: use one of {', '.join(KINDS)}")
    payload: dict[str, Tensor] = {}
    for key, value in update.items():
        if SEP in key:
            raise ValueError(f"key {key!r} contains {SEP!r}, which payload keys reserve")
        flat = value.detach().to("cpu", torch.float32).reshape(-1)
        if not bool(torch.isfinite(flat).all()):
            raise ValueError(f"{key!r}: the update has non-finite values; nothing sensible can be compressed")
        if kind == "fp16":
            if flat.numel() and float(flat.abs().max()) > FP16_MAX:
                raise ValueError(f"{key!r}: update values beyond ±{FP16_MAX:g} do not fit float16")
            payload[f"{key}::fp16"] = value.detach().to("cpu", torch.float16).contiguous()
        elif kind == "int8":
            blocks = _blocks(flat)
            scale = blocks.abs().amax(dim=1) / 127.0
            safe = torch.where(scale > 0, scale, torch.ones_like(scale))
            codes = torch.round(blocks / safe[:, None]).clamp_(-127, 127).to(torch.int8)
            payload[f"{key}::int8"] = codes.reshape(-1)[:flat.numel()].contiguous()
            payload[f"{key}::scale"] = scale.contiguous()
        elif kind == "nf4":
            blocks = _blocks(flat)
            absmax = blocks.abs().amax(dim=1)
            safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
            levels = torch.tensor(NF4_LEVELS)
            codes = torch.bucketize(blocks / safe[:, None], (levels[1:] + levels[:-1]) / 2).reshape(-1)
            codes = codes[:flat.numel()].to(torch.uint8)
            if codes.numel() % 2:
                codes = torch.cat([codes, torch.zeros(1, dtype=torch.uint8)])  # the padding nibble is 0
            payload[f"{key}::nf4"] = ((codes[0::2] << 4) | codes[1::2]).contiguous()
            payload[f"{key}::absmax"] = absmax.contiguous()
        elif kind == "sign":
            blocks = _blocks(flat)
            counts = torch.full((blocks.shape[0],), BLOCK, dtype=torch.float32)
            counts[-1] = flat.numel() - BLOCK * (blocks.shape[0] - 1) if blocks.shape[0] else BLOCK
            bits = (flat >= 0).to(torch.uint8)
            bits = torch.nn.functional.pad(bits, (0, (-bits.numel()) % 8)).reshape(-1, 8)  # padding bits are 0
            payload[f"{key}::sign"] = (bits * _BIT_WEIGHTS).sum(dim=1).to(torch.uint8).contiguous()
            payload[f"{key}::scale"] = (blocks.abs().sum(dim=1) / counts).contiguous()
        else:  # topk
            k = topk_count(flat.numel(), topk_fraction)
            index = torch.topk(flat.abs(), k, sorted=False).indices.sort().values if k else flat.new_zeros(0).long()
            values = flat[index]
            fits = values.numel() == 0 or float(values.abs().max()) <= FP16_MAX
            payload[f"{key}::index"] = index.to(torch.int32 if flat.numel() < 2**31 else torch.int64).contiguous()
            payload[f"{key}::value"] = values.to(torch.float16 if fits else torch.float32).contiguous()
    return payload


# --- decompress (trusting nothing) ---------------------------------------------------------------------------------
def _expect(key: str, value: object, dtypes: tuple[torch.dtype, ...], shape: tuple[int, ...] | None) -> Tensor:
    if not isinstance(value, Tensor):
        raise ValueError(f"{key!r} is a {type(value).__name__}, not a tensor")
    if value.dtype not in dtypes:
        raise ValueError(f"{key!r} is {value.dtype}, expected {' or '.join(str(d) for d in dtypes)}")
    if shape is not None and tuple(value.shape) != shape:
        raise ValueError(f"{key!r} has shape {tuple(value.shape)}, expected {shape}")
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{key!r} has {int((~torch.isfinite(value)).sum())} non-finite values")
    return value


def _preview(keys: list[str], limit: int = 3) -> str:
    return ", ".join(repr(k) for k in keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def decompress(payload: Mapping[str, Tensor], reference: Mapping[str, Tensor], kind: str, *,
               topk_fraction: float | None = None) -> dict[str, Tensor]:
    """Δ per key of `reference` (float32 CPU tensors of the reference's shapes) from a `kind` payload; `reference`
    gives the keys and shapes expected (its values are not read). With `topk_fraction`, each key must carry exactly
    the agreed k values. ValueError with the reason for anything malformed."""
    if kind not in KINDS:
        raise ValueError(f"unknown compression {kind!r}: use one of {', '.join(KINDS)}")
    if not isinstance(payload, Mapping):
        raise ValueError(f"the payload is a {type(payload).__name__}, not a dict of tensors")
    expected = {f"{key}{SEP}{suffix}": key for key in reference for suffix in SUFFIXES[kind]}
    missing = [k for k in expected if k not in payload]
    extra = [k for k in payload if k not in expected]
    if missing or extra:
        problems = ([f"missing {_preview(missing)}"] if missing else []) + \
            ([f"unexpected {_preview(extra)}"] if extra else [])
        raise ValueError(f"not a {kind} payload of this adapter: {'; '.join(problems)}")
    update: dict[str, Tensor] = {}
    for key, ref in reference.items():
        shape, numel = tuple(ref.shape), ref.numel()
        if kind == "fp16":
            value = _expect(f"{key}::fp16", payload[f"{key}::fp16"], (torch.float16,), shape)
            update[key] = value.to(torch.float32)
        elif kind == "int8":
            codes = _expect(f"{key}::int8", payload[f"{key}::int8"], (torch.int8,), (numel,))
            scale = _expect(f"{key}::scale", payload[f"{key}::scale"], (torch.float32,), (_num_blocks(numel),))
            if bool((codes == -128).any()):
                raise ValueError(f"{key + '::int8'!r} holds the code -128, outside the symmetric range ±127")
            if bool((scale < 0).any()):
                raise ValueError(f"{key + '::scale'!r} has negative scales")
            values = _blocks(codes.to(torch.float32)) * scale[:, None]
            update[key] = values.reshape(-1)[:numel].reshape(shape)
        elif kind == "nf4":
            packed = _expect(f"{key}::nf4", payload[f"{key}::nf4"], (torch.uint8,), ((numel + 1) // 2,))
            absmax = _expect(f"{key}::absmax", payload[f"{key}::absmax"], (torch.float32,), (_num_blocks(numel),))
            if bool((absmax < 0).any()):
                raise ValueError(f"{key + '::absmax'!r} has negative block maxima")
            if numel % 2 and int(packed[-1]) & 0x0F:
                raise ValueError(f"{key + '::nf4'!r}: the padding nibble of the last byte is not 0")
            codes = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)[:numel].long()
            values = _blocks(torch.tensor(NF4_LEVELS)[codes]) * absmax[:, None]
            update[key] = values.reshape(-1)[:numel].reshape(shape)
        elif kind == "sign":
            packed = _expect(f"{key}::sign", payload[f"{key}::sign"], (torch.uint8,), ((numel + 7) // 8,))
            scale = _expect(f"{key}::scale", payload[f"{key}::scale"], (torch.float32,), (_num_blocks(numel),))
            if bool((scale < 0).any()):
                raise ValueError(f"{key + '::scale'!r} has negative scales")
            bits = ((packed[:, None] & _BIT_WEIGHTS) > 0).reshape(-1)
            if bool(bits[numel:].any()):
                raise ValueError(f"{key + '::sign'!r}: the padding bits of the last byte are not 0")
            signs = bits[:numel].to(torch.float32) * 2 - 1
            update[key] = (_blocks(signs) * scale[:, None]).reshape(-1)[:numel].reshape(shape)
        else:  # topk
            index = _expect(f"{key}::index", payload[f"{key}::index"], (torch.int32, torch.int64), None)
            value = _expect(f"{key}::value", payload[f"{key}::value"], (torch.float16, torch.float32), None)
            if index.dim() != 1 or value.dim() != 1 or index.numel() != value.numel():
                raise ValueError(f"{key!r}: index shape {tuple(index.shape)} and value shape "
                                 f"{tuple(value.shape)} are not two vectors of one length")
            k = index.numel()
            wanted = topk_count(numel, topk_fraction) if topk_fraction is not None else None
            if wanted is not None and k != wanted:
                raise ValueError(f"{key!r}: {k} values sent, TOPK_FRACTION={topk_fraction:g} of {numel} agrees on "
                                 f"{wanted}")
            if k > numel:
                raise ValueError(f"{key!r}: {k} values for a tensor of {numel}")
            if k and (int(index.min()) < 0 or int(index.max()) >= numel):
                raise ValueError(f"{key!r}: index out of range [0, {numel}) (min {int(index.min())}, max "
                                 f"{int(index.max())})")
            if k > 1 and not bool((index[1:] > index[:-1]).all()):
                raise ValueError(f"{key!r}: indices are not strictly increasing (repeated or unsorted)")
            flat = torch.zeros(numel, dtype=torch.float32)
            flat[index.long()] = value.to(torch.float32)
            update[key] = flat.reshape(shape)
    return update


# --- error feedback ------------------------------------------------------------------------------------------------
def compress_with_feedback(update: Mapping[str, Tensor], residual: Mapping[str, Tensor] | None, kind: str, *,
                           topk_fraction: float = 0.05) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(payload, new residual): compress update + residual, keep what the payload does not carry for next time.

    A residual that does not fit the update (other keys or shapes: the settings changed) is dropped; starting over
    from zero is always correct, only less accurate for one round."""
    corrected = {key: value.detach().to("cpu", torch.float32) for key, value in update.items()}
    if residual and set(residual) == set(corrected) and all(
            tuple(residual[k].shape) == tuple(v.shape) for k, v in corrected.items()):
        corrected = {key: value + residual[key].to(torch.float32) for key, value in corrected.items()}
    payload = compress(corrected, kind, topk_fraction=topk_fraction)
    sent = decompress(payload, corrected, kind)
    return payload, {key: (corrected[key] - sent[key]).contiguous() for key in corrected}


def payload_kind(state: Mapping[str, Tensor]) -> str | None:
    """None for a plain adapter (no payload key); else the kind its first payload key's suffix names ("unknown"
    when none does: `decompress` then refuses it)."""
    for key in state:
        if SEP in key:
            suffix = key.rpartition(SEP)[2]
            return next((kind for kind, names in SUFFIXES.items() if suffix in names), "unknown")
    return None


def payload_tensor_keys(payload: Mapping[str, Tensor]) -> set[str]:
    """The adapter keys a payload carries (its keys without their suffixes)."""
    return {key.rpartition(SEP)[0] for key in payload if SEP in key}


def payload_bytes(payload: Mapping[str, Tensor]) -> int:
    """Bytes of the payload's tensor data (without any file or message framing)."""
    return sum(t.numel() * t.element_size() for t in payload.values())
