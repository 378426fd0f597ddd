"""Input validation for the public functions: clear errors that name the argument."""
import math

import torch

from fastnl import affinities


def check_operands(query, key, value, center, kernel, scale):
    """Raise a ValueError/TypeError naming the offending argument; return nothing."""
    affinity = affinities.get(kernel)  # a ValueError naming the kernels when unknown
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    named = {"query": query, "key": key, "value": value}
    if center is not None:
        named["center"] = center
    for name, tensor in named.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 3:
            raise ValueError(f"{name} must have 3 dimensions (B, positions, width_qk), got shape {tuple(tensor.shape)}")
        if not tensor.is_floating_point():
            raise TypeError(f"{name} must have a floating dtype, got {tensor.dtype}")
    dtypes = {name: t.dtype for name, t in named.items()}
    if len(set(dtypes.values())) > 1:
        raise TypeError(f"query, key, value and center must share one dtype, got {dtypes}")
    devices = {name: t.device for name, t in named.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"query, key, value and center must be on one device, got {devices}")

    batch, num_queries, width_qk = query.shape
    num_keys = key.shape[1]
    for name, tensor in named.items():
        if tensor.shape[0] != batch:
            raise ValueError(f"{name} has batch size {tensor.shape[0]}, query has {batch}")
    if key.shape[2] != width_qk:
        raise ValueError(f"key has width D={key.shape[2]}, query has D={width_qk}")
    if value.shape[1] != num_keys:
        raise ValueError(f"value has M={value.shape[1]} positions, key has M={num_keys}")
    if num_keys == 0:
        raise ValueError("key has no positions (M = 0): the normalisation 1/C_i is undefined")
    if width_qk == 0:
        raise ValueError("query and key have width D = 0: there is no affinity to compute")
    if affinity.width_qk is not None and width_qk != affinity.width_qk:
        raise ValueError(f"kernel={kernel!r} needs query and key of width D={affinity.width_qk} "
                         f"({affinity.formula}), got D={width_qk}")
    if center is not None and center.shape != (batch, num_queries, value.shape[2]):
        raise ValueError(
            f"center must have shape (B, N, E) = {(batch, num_queries, value.shape[2])}, got {tuple(center.shape)}"
        )


def check_log_normalizer(log_normalizer, query):
    """The cached row statistics must belong to this query: (B, N), float, same device."""
    if not isinstance(log_normalizer, torch.Tensor) or not log_normalizer.is_floating_point():
        raise TypeError("log_normalizer must be a floating tensor (the one returned by nonlocal_attend)")
    if log_normalizer.shape != query.shape[:2]:
        raise ValueError(
            f"log_normalizer must have shape (B, N) = {tuple(query.shape[:2])}, got {tuple(log_normalizer.shape)}"
        )
    if log_normalizer.device != query.device:
        raise ValueError(f"log_normalizer is on {log_normalizer.device}, query on {query.device}")
