"""The public functional API: nonlocal_aggregate, nonlocal_diffuse, nonlocal_attend.

Under `torch.autocast` the operators run in autocast's dtype (bfloat16 on CPU, float16
or bfloat16 on CUDA), as the matmuls they are made of would: float32 operands are cast
to it, float64 ones stay float64 (autocast leaves float64 alone), and the row
log_normalizer stays float32. Outputs are then in that dtype.
"""
import torch

from fastnl import affinities, backends, ops, reference
from fastnl._checks import check_log_normalizer, check_operands


def _operands(query, key, value, center, kernel, scale):
    """The operands as autocast would hand them to a matmul (unchanged outside autocast),
    then checked: errors name the argument."""
    if isinstance(query, torch.Tensor) and torch.is_autocast_enabled(query.device.type):
        dtype = torch.get_autocast_dtype(query.device.type)
        value_is_center = center is value  # cast once, and stay one tensor (fastnl.ops uses that)
        query, key, value, center = (
            t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t
            for t in (query, key, value, None if value_is_center else center))
        center = value if value_is_center else center
    check_operands(query, key, value, center, kernel, scale)
    return query, key, value, center


def nonlocal_attend(query, key, value, center=None, *, kernel="softmax", scale=1.0, backend=None,
                    log_normalizer=None):
    """The one entry both public functions use; also returns the reusable row statistics.

    Returns (out, log_normalizer): out as `nonlocal_aggregate` (center None) or
    `nonlocal_diffuse` with an explicit center; log_normalizer is the (B, N) row
    log-sum-exp of the softmax kernel (None for dot/concat and the reference backend).
    Passing it back for the same query/key skips the statistics pass: a
    `NonlocalStage` computes it once and all its blocks reuse it. It is a cache, not
    a differentiable output; gradients of query and key are exact either way.
    """
    query, key, value, center = _operands(query, key, value, center, kernel, scale)
    if log_normalizer is not None:
        check_log_normalizer(log_normalizer, query)
    return _attend(query, key, value, center, kernel, scale, backend, log_normalizer)


def _attend(query, key, value, center, kernel, scale, backend, log_normalizer=None):
    """nonlocal_attend on checked operands."""
    if backend == "reference":
        if center is None:
            return reference.aggregate(query, key, value, kernel=kernel, scale=scale), None
        return reference.diffuse(query, key, value, center, kernel=kernel, scale=scale), None
    backend = backends.resolve(backend, query.device.type, (query.shape[-1], value.shape[-1]), kernel)
    scale = float(scale)
    affinity = affinities.get(kernel)
    if affinity.normalisation == "softmax":
        if affinity.prepare is not None:
            query, key = affinity.prepare(query, key)
        if log_normalizer is None:
            return ops.softmax_forward(query, key, value, center, scale, backend)
        out = ops.softmax_forward_with_log_normalizer(query, key, value, center, log_normalizer, scale, backend)
        return out, log_normalizer
    forward, _ = ops.mean_ops(kernel)
    return forward(query, key, value, center, scale, backend)[0], None


def nonlocal_aggregate(query, key, value, *, kernel="softmax", scale=1.0, backend=None):
    """y_i = (1 / C_i) sum_j w(i, j) v_j   (Wang et al.'s nonlocal operation).

    query (B, N, D), key (B, M, D), value (B, M, E) -> (B, N, E), any float dtype.
    kernel "softmax": w = exp(scale q_i.k_j), C_i = sum_j w;  "dot": w = scale q_i.k_j,
    C_i = M;  "concat" (D = 1): w = scale relu(q_i + k_j), C_i = M.
    backend None picks the fastest available for the device; "reference" materialises
    the N x M matrix; "torch" is memory-light plain PyTorch (see fastnl.backends).
    """
    query, key, value, _ = _operands(query, key, value, None, kernel, scale)
    return _attend(query, key, value, None, kernel, scale, backend)[0]


def nonlocal_diffuse(query, key, value, center, *, kernel="softmax", scale=1.0, backend=None):
    """y_i = (1 / C_i) sum_j w(i, j) (v_j - c_i)   (Tao et al.'s nonlocal diffusion).

    As `nonlocal_aggregate`, with center (B, N, E): pass the value itself (M = N) for the
    paper's v_j - v_i. For softmax this is aggregate - center; for dot/concat the center
    is weighted by the row's total affinity sum_j w(i, j) / M. (None is not a center
    here: in `nonlocal_attend`, center=None means no center, i.e. the aggregate.)
    """
    if center is None:
        raise TypeError("nonlocal_diffuse needs a center (B, N, E): pass value for Tao et al.'s "
                        "v_j - v_i, or call nonlocal_aggregate for no center")
    query, key, value, center = _operands(query, key, value, center, kernel, scale)
    return _attend(query, key, value, center, kernel, scale, backend)[0]
