"""Backends: the modules that compute the fused operators, and how one is chosen.

Every backend module exposes the same functions (the contract below); `fastnl.ops`
wraps them in `torch.library` custom ops with autograd, so a backend only writes
forward and backward math. Inputs arrive validated: same dtype and device,
contiguous, query (B, N, D), key (B, M, D), value (B, M, E), center (B, N, E) or None.

    unavailable_reason(device_type) -> None when it can run there, else why not
    refuses(width_qk, width_v) -> None, or why these widths are out of its range
        (optional; a backend without it takes every width)
    softmax_forward(query, key, value, center, log_normalizer, scale)
        -> (out, log_normalizer)
        out_i = sum_j p_ij v_j - [c_i], p_ij = exp(scale q_i.k_j - log_normalizer_i);
        log_normalizer (B, N), the row log-sum-exp, is float64 for float64 inputs, else
        float32. When given it is that of these query/key: use it (a single pass, no
        online rescaling) and return it.
    softmax_backward(grad_out, query, key, value, center, out, log_normalizer, scale)
        -> (grad_query, grad_key, grad_value)
    softmax_values_backward(grad_out, query, key, log_normalizer, scale) -> grad_value
    softmax_shared_backward(grad_outs, query, key, values, centers, outs, log_normalizer, scale)
        -> (grad_query, grad_key, grad_value of the first)
        (optional, both or neither) K calls sharing one query, key and log_normalizer (a
        stage's blocks): the later K - 1 take only their values' gradient, P^T grad_out,
        and one call gives dQ and dK of all K at once (lists of the K blocks' tensors;
        centers empty or K). `fastnl.shared_affinity` uses them where a backend has them.
    NAME_forward(query, key, value, center, scale) -> (out, row_weight)
        for each mean-normalised kernel NAME of fastnl.affinities it implements (dot,
        concat): w_ij its weights, C_i = M; row_weight_i = sum_j w_ij / M (B, N);
        out_i = sum_j w_ij v_j / M - [row_weight_i c_i]
    NAME_backward(grad_out, query, key, value, center, scale)
        -> (grad_query, grad_key, grad_value)

Softmax-normalised kernels all run softmax_forward / softmax_backward (a kernel's
`prepare` has mapped query and key before); a backend without NAME_forward does not run
kernel NAME, and `resolve` passes it over.

The center's gradient is -grad_out (softmax) or -row_weight * grad_out (dot, concat);
`fastnl.ops` forms it, so backward functions return only the three above.
"""
import functools
import importlib
import warnings

import torch

from fastnl import affinities

# name -> module, in order of preference for backend=None on each device type
_MODULES = {
    "torch": "fastnl.backends.torch_tiled",
    "cpp": "fastnl.backends.cpp",
    "triton": "fastnl.backends.triton",
    "cuda": "fastnl.backends.cuda",
}
_PREFERENCE = {
    "cpu": ["cpp", "torch"],
    "cuda": ["triton", "cuda", "torch"],
}


def names():
    """All backend names accepted by `backend=` (besides "reference")."""
    return sorted(_MODULES)


def available(device_type):
    """The backends that can run on `device_type` in this process, by name."""
    return [name for name in names() if unavailable_reason(name, device_type) is None]


def _load(name):
    return importlib.import_module(_MODULES[name])


@functools.cache
def unavailable_reason(name, device_type):
    """None if backend `name` can run on `device_type`, else why not (asked once per process)."""
    try:
        module = _load(name)
    except Exception as error:  # a backend that fails to import is unavailable, not fatal
        return f"importing {_MODULES[name]} failed: {error}"
    return module.unavailable_reason(device_type)


def accumulate_dtype(dtype):
    """float64 stays float64; everything else accumulates in float32 (and log_normalizer is stored so)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def refuse_widths_above(limit):
    """A `refuses` for backends whose tiles or rows hold at most `limit` features."""

    def refuses(width_qk, width_v):
        if max(width_qk, width_v) > limit:
            return f"widths D and E up to {limit}, got D={width_qk}, E={width_v}"
        return None

    return refuses


def refusal(name, kernel=None, widths=None):
    """None if backend `name` implements `kernel` (softmax-normalised kernels all run its
    softmax functions, a mean-normalised one needs its own) and takes the widths (D, E),
    else why not; None arguments are not checked."""
    module = _load(name)
    if kernel is not None:
        if not hasattr(module, f"{affinities.get(kernel).functions}_forward"):
            return f"it does not implement kernel {kernel!r}"
    refuses = getattr(module, "refuses", None)
    return None if refuses is None or widths is None else refuses(*widths)


@functools.cache
def _warn_passed_over(name, reason, chosen):
    warnings.warn(f"fastnl: backend {name!r} passed over ({reason}); using {chosen!r}", RuntimeWarning,
                  stacklevel=4)


@torch.compiler.assume_constant_result  # decided while tracing; no graph break
def resolve(name, device_type, widths=None, kernel=None):
    """The backend name to use: `name` checked, or the preferred one when None.

    With `widths` (D, E) and `kernel`, a preferred backend that refuses them is passed
    over with one warning per reason; an explicitly named one raises instead.
    """
    if name is None:
        passed_over = []
        for candidate in _PREFERENCE.get(device_type, ["torch"]):
            if unavailable_reason(candidate, device_type) is not None:
                continue
            reason = refusal(candidate, kernel, widths)
            if reason is None:
                for skipped, reason in passed_over:
                    _warn_passed_over(skipped, reason, candidate)
                return candidate
            passed_over.append((candidate, reason))
        return "torch"
    if name not in _MODULES:
        raise ValueError(
            f"unknown backend {name!r}; choose one of {['reference'] + names()} or None"
        )
    reason = unavailable_reason(name, device_type)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} is not available on {device_type}: {reason}")
    reason = refusal(name, kernel, widths)
    if reason is not None:
        raise ValueError(f"backend {name!r} cannot take these operands: {reason}; use backend=None or 'torch'")
    return name


def get(name):
    """The module implementing backend `name` (already resolved)."""
    return _load(name)


def bfloat16_path(name):
    """How backend `name` computes bfloat16 inputs, where it chooses (the cpp backend's
    `bfloat16_path()`: native on AMX or vdpbf16ps, or converted to float32); None for
    the backends that have one way, "reference" among them."""
    choose = getattr(get(name), "bfloat16_path", None) if name in _MODULES else None
    return choose() if choose is not None else None
