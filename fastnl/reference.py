"""The materialised definition of the nonlocal operators: slow, obviously right.

Every backend is tested against these functions. They build the full (B, N, M)
affinity matrix in the inputs' dtype and let autograd differentiate it, so they hold
O(N x M) memory: use them for checking, never for training.
"""
import torch


def normalized_affinity(query, key, *, kernel="softmax", scale=1.0):
    """P[b, i, j] = w(i, j) / C_i, shape (B, N, M).

    softmax: w = exp(scale * q_i . k_j), C_i = sum_j w(i, j)
    dot:     w = scale * q_i . k_j,      C_i = M
    concat:  w = scale * relu(q_i + k_j) (D == 1), C_i = M
    """
    num_keys = key.shape[1]
    if kernel == "softmax":
        return torch.softmax(scale * (query @ key.transpose(1, 2)), dim=-1)
    if kernel == "dot":
        return scale * (query @ key.transpose(1, 2)) / num_keys
    if kernel == "concat":
        return scale * torch.relu(query + key.transpose(1, 2)) / num_keys
    raise ValueError(f"unknown kernel {kernel!r}")


def aggregate(query, key, value, *, kernel="softmax", scale=1.0):
    """y_i = (1 / C_i) sum_j w(i, j) v_j.  query (B, N, D), key (B, M, D), value (B, M, E)."""
    return normalized_affinity(query, key, kernel=kernel, scale=scale) @ value


def diffuse(query, key, value, center=None, *, kernel="softmax", scale=1.0):
    """y_i = (1 / C_i) sum_j w(i, j) (v_j - c_i), c = center (B, N, E), default value."""
    if center is None:
        center = value
    affinity = normalized_affinity(query, key, kernel=kernel, scale=scale)
    return affinity @ value - affinity.sum(dim=-1, keepdim=True) * center
