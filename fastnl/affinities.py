"""The affinity kernels w(i, j), in one table that the reference, the operand checks,
the dispatch, the modules and the tests read.

An entry says how to compute its affinity the materialised way (the reference) and
which fused path runs it:

- normalisation "softmax" (C_i = sum_j w(i, j)): `scores` gives the logits s_ij with
  w = exp(s_ij); the fused softmax ops run it. A `prepare` hook may map query and key
  first (differentiably, in plain PyTorch): a cosine affinity normalises them, and needs
  no kernel of its own.
- normalisation "mean" (C_i = M): `scores` gives w itself; the kernel has its own pair
  of custom ops (`fastnl::NAME_forward`, `NAME_backward`, defined by fastnl.ops) and
  each backend that implements it defines `NAME_forward` and `NAME_backward`.

Adding a kernel is `register(Affinity(...))` plus, for the mean kind, its backend
functions; the tests parametrise over `names()`.
"""
from collections.abc import Callable
from dataclasses import dataclass

import torch

NORMALISATIONS = ("softmax", "mean")


@dataclass(frozen=True)
class Affinity:
    name: str
    normalisation: str
    scores: Callable  # (query, key, scale) -> (B, N, M): the logits (softmax) or w (mean)
    formula: str  # w(i, j) and C_i, for messages and docs
    width_qk: int | None = None  # the query/key width D the kernel needs (concat: 1), None: any
    prepare: Callable | None = None  # softmax kind: (query, key) -> (query, key) before the fused ops

    def __post_init__(self):
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {self.normalisation!r}")
        if self.prepare is not None and self.normalisation != "softmax":
            raise ValueError("prepare is for softmax kernels, which run the shared fused softmax ops")

    @property
    def functions(self):
        """The prefix of the backend functions that compute it: every softmax kernel runs
        `softmax_forward`/`softmax_backward`, a mean kernel its own `NAME_forward`/..."""
        return "softmax" if self.normalisation == "softmax" else self.name


_REGISTRY = {}


def register(affinity):
    """Add a kernel (its name must be new); the mean kind gets its custom ops here."""
    if affinity.name in _REGISTRY:
        raise ValueError(f"kernel {affinity.name!r} is already registered")
    _REGISTRY[affinity.name] = affinity
    if affinity.normalisation == "mean":
        from fastnl import ops  # the ops module reads this table: imported when first needed

        ops.mean_ops(affinity.name)
    return affinity


def unregister(name):
    """Remove a kernel added by `register` (tests that add a toy kernel clean up)."""
    _REGISTRY.pop(name)


def names():
    return tuple(_REGISTRY)


def get(name):
    """The entry for kernel `name`, or a ValueError listing the kernels."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"kernel must be one of {names()}, got {name!r}") from None


register(Affinity("softmax", "softmax", lambda q, k, scale: scale * (q @ k.transpose(1, 2)),
                  "w = exp(scale q_i.k_j), C_i = sum_j w"))
register(Affinity("dot", "mean", lambda q, k, scale: scale * (q @ k.transpose(1, 2)),
                  "w = scale q_i.k_j, C_i = M"))
register(Affinity("concat", "mean", lambda q, k, scale: scale * torch.relu(q + k.transpose(1, 2)),
                  "w = scale relu(q_i + k_j) (D = 1), C_i = M", width_qk=1))
