"""Server optimizers applied to the averaged client models (adaptive FL).

Papers: Reddi et al. 2021, "Adaptive Federated Optimization" (FedAdam,
FedYogi, FedAdagrad); Hsu et al. 2019, "Measuring the Effects of Non-Identical
Data Distribution for Federated Visual Classification" (FedAvgM).

Why: treating delta = averaged - global as a pseudo-gradient and feeding it to
a server-side momentum / adaptive optimizer often converges faster and more
stably than replacing the model with the average. Updates follow Flower's
strategies (flwr.server.strategy.FedAdam etc.) and defaults, written as
ascent on delta:

    FedAvgM:    v = momentum * v + delta;            x += server_lr * v
    FedAdam:    m = b1 m + (1-b1) delta;  v = b2 v + (1-b2) delta^2
    FedYogi:    m as Adam;  v = v - (1-b2) delta^2 sign(v - delta^2)
    FedAdagrad: m = delta (b1 = 0);       v = v + delta^2
    all adaptive: x += eta * m / (sqrt(v) + tau)

FedAdam additionally applies Adam's bias correction
eta_t = eta sqrt(1 - b2^t) / (1 - b1^t) with t = number of steps taken (Flower
uses its server round + 1 for t). ``eta_l`` is the client learning rate from
the paper; it is stored for the client side and not used here.

The optimizers are the only stateful objects of the package: ``step`` never
modifies its input dicts but updates the optimizer's own moment buffers.
State is kept in float32; the new global model has the global model's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ._tensors import StateDict


def _pseudo_gradient(global_state: Mapping[str, Tensor], averaged: Mapping[str, Tensor]) -> dict[str, Tensor]:
    if set(global_state) != set(averaged):
        missing = sorted(set(global_state) - set(averaged))[:3]
        extra = sorted(set(averaged) - set(global_state))[:3]
        raise ValueError(f"averaged state keys differ from global (missing {missing}, extra {extra})")
    delta = {}
    for key, glob in global_state.items():
        if averaged[key].shape != glob.shape:
            raise ValueError(
                f"shape mismatch at {key!r}: {tuple(averaged[key].shape)} vs {tuple(glob.shape)}"
            )
        delta[key] = averaged[key].detach().to("cpu", torch.float32) - glob.detach().to("cpu", torch.float32)
    return delta


class ServerOptimizer:
    """Base class: ``step(global, averaged) -> new global`` plus state round trip."""

    name = "base"
    _buffers: tuple[str, ...] = ()

    def __init__(self, **hparams: float) -> None:
        self.hparams = {k: float(v) for k, v in hparams.items()}
        self.steps = 0
        self.buffers: dict[str, dict[str, Tensor]] = {name: {} for name in self._buffers}

    def __getattr__(self, item: str) -> float:
        hparams = self.__dict__.get("hparams", {})
        if item in hparams:
            return hparams[item]
        raise AttributeError(item)

    def step(self, global_state: StateDict, averaged_state: StateDict) -> StateDict:
        """Apply one server update; the pseudo-gradient is averaged - global."""
        delta = _pseudo_gradient(global_state, averaged_state)
        self.steps += 1
        out: StateDict = {}
        for key, glob in global_state.items():
            direction = self._direction(key, delta[key])
            new = glob.detach().to("cpu", torch.float32) + direction
            out[key] = new.to(glob.dtype)
        return out

    def _direction(self, key: str, delta: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _buffer(self, name: str, key: str, like: Tensor) -> Tensor:
        store = self.buffers[name]
        if key not in store:
            store[key] = torch.zeros_like(like)
        return store[key]

    def state_dict(self) -> dict[str, Any]:
        """Plain dict of scalars and tensors (torch.save-able) for resume."""
        return {
            "name": self.name,
            "hparams": dict(self.hparams),
            "steps": self.steps,
            "buffers": {n: {k: t.clone() for k, t in b.items()} for n, b in self.buffers.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from ``state_dict()`` output; the optimizer kind must match."""
        if state.get("name") != self.name:
            raise ValueError(f"state is for {state.get('name')!r}, not {self.name!r}")
        self.hparams = {k: float(v) for k, v in state["hparams"].items()}
        self.steps = int(state["steps"])
        self.buffers = {name: {} for name in self._buffers}
        for name, buf in state["buffers"].items():
            if name not in self.buffers:
                raise ValueError(f"unknown buffer {name!r} for {self.name}")
            self.buffers[name] = {k: t.detach().to("cpu", torch.float32).clone() for k, t in buf.items()}


class FedAvgM(ServerOptimizer):
    """Server momentum (Hsu 2019): x += server_lr * (momentum * v + delta)."""

    name = "fedavgm"
    _buffers = ("momentum",)

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9) -> None:
        if server_lr <= 0 or not 0.0 <= momentum < 1.0:
            raise ValueError("need server_lr > 0 and 0 <= momentum < 1")
        super().__init__(server_lr=server_lr, momentum=momentum)

    def _direction(self, key: str, delta: Tensor) -> Tensor:
        buf = self._buffer("momentum", key, delta)
        buf.mul_(self.momentum).add_(delta)
        return self.server_lr * buf


class _Adaptive(ServerOptimizer):
    _buffers = ("m", "v")

    def __init__(self, eta: float, eta_l: float, beta_1: float, beta_2: float, tau: float) -> None:
        if eta <= 0 or tau <= 0 or not (0 <= beta_1 < 1 and 0 <= beta_2 < 1):
            raise ValueError("need eta > 0, tau > 0, 0 <= beta_1, beta_2 < 1")
        super().__init__(eta=eta, eta_l=eta_l, beta_1=beta_1, beta_2=beta_2, tau=tau)

    def _second_moment(self, v: Tensor, delta_sq: Tensor) -> None:
        raise NotImplementedError  # pragma: no cover

    def _step_size(self) -> float:
        return self.eta

    def _direction(self, key: str, delta: Tensor) -> Tensor:
        m = self._buffer("m", key, delta)
        v = self._buffer("v", key, delta)
        m.mul_(self.beta_1).add_(delta, alpha=1.0 - self.beta_1)
        self._second_moment(v, delta * delta)
        return self._step_size() * m / (v.sqrt() + self.tau)


class FedAdam(_Adaptive):
    """FedAdam (Reddi 2021), Flower defaults, Adam bias correction on eta."""

    name = "fedadam"

    def __init__(self, eta: float = 1e-1, eta_l: float = 1e-1, beta_1: float = 0.9,
                 beta_2: float = 0.99, tau: float = 1e-9) -> None:
        super().__init__(eta, eta_l, beta_1, beta_2, tau)

    def _second_moment(self, v: Tensor, delta_sq: Tensor) -> None:
        v.mul_(self.beta_2).add_(delta_sq, alpha=1.0 - self.beta_2)

    def _step_size(self) -> float:
        t = self.steps
        return self.eta * math.sqrt(1.0 - self.beta_2**t) / (1.0 - self.beta_1**t)


class FedYogi(_Adaptive):
    """FedYogi (Reddi 2021): additive, sign-controlled second moment; Flower defaults."""

    name = "fedyogi"

    def __init__(self, eta: float = 1e-2, eta_l: float = 0.0316, beta_1: float = 0.9,
                 beta_2: float = 0.99, tau: float = 1e-3) -> None:
        super().__init__(eta, eta_l, beta_1, beta_2, tau)

    def _second_moment(self, v: Tensor, delta_sq: Tensor) -> None:
        v.sub_((1.0 - self.beta_2) * delta_sq * torch.sign(v - delta_sq))


class FedAdagrad(_Adaptive):
    """FedAdagrad (Reddi 2021): v accumulates delta^2, no momentum; Flower defaults."""

    name = "fedadagrad"

    def __init__(self, eta: float = 1e-1, eta_l: float = 1e-1, tau: float = 1e-9) -> None:
        super().__init__(eta, eta_l, 0.0, 0.0, tau)

    def _second_moment(self, v: Tensor, delta_sq: Tensor) -> None:
        v.add_(delta_sq)


SERVER_OPTIMIZERS: dict[str, type[ServerOptimizer]] = {
    cls.name: cls for cls in (FedAvgM, FedAdam, FedYogi, FedAdagrad)
}


def make_server_optimizer(name: str, **options: float) -> ServerOptimizer:
    """Build a server optimizer by name: fedavgm, fedadam, fedyogi, fedadagrad."""
    try:
        cls = SERVER_OPTIMIZERS[name]
    except KeyError:
        raise ValueError(
            f"unknown server optimizer {name!r}; supported: {sorted(SERVER_OPTIMIZERS)}"
        ) from None
    return cls(**options)
