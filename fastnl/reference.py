"""The materialised definition of the nonlocal operators: slow, obviously right.

Every backend is tested against these functions. They build the full (B, N, M)
affinity matrix in the inputs' dtype and let autograd differentiate it, so they hold
O(N x M) memory: use them for checking, never for training.
"""
import torch

from fastnl import affinities


def normalized_affinity(query, key, *, kernel="softmax", scale=1.0):
    """P[b, i, j] = w(i, j) / C_i, shape (B, N, M), for a kernel of fastnl.affinities:
    softmax of its scores (C_i = sum_j w), or its scores / M (C_i = M)."""
    affinity = affinities.get(kernel)
    if affinity.prepare is not None:
        query, key = affinity.prepare(query, key)
    scores = affinity.scores(query, key, scale)
    if affinity.normalisation == "softmax":
        return torch.softmax(scores, dim=-1)
    return scores / key.shape[1]


def aggregate(query, key, value, *, kernel="softmax", scale=1.0):
    """y_i = (1 / C_i) sum_j w(i, j) v_j.  query (B, N, D), key (B, M, D), value (B, M, E)."""
    return normalized_affinity(query, key, kernel=kernel, scale=scale) @ value


def diffuse(query, key, value, center, *, kernel="softmax", scale=1.0):
    """y_i = (1 / C_i) sum_j w(i, j) (v_j - c_i), c = center (B, N, E)."""
    affinity = normalized_affinity(query, key, kernel=kernel, scale=scale)
    return affinity @ value - affinity.sum(dim=-1, keepdim=True) * center
