"""Backward of the softmax nonlocal operator: recompute tiles from the saved log_normalizer.

FlashAttention-2's scheme in three kernels. A preprocessing kernel forms
delta_i = dO_i . O_i, with O the aggregate (out + center for diffuse), so that
dS_ij = p_ij (dO_i . v_j - delta_i). Then one kernel per key tile accumulates dK and dV
over all query tiles, and one per query tile accumulates dQ over all key tiles; each
recomputes p_ij = exp(scale q_i.k_j - log_normalizer_i) instead of reading a stored matrix, and
neither needs atomics. Padded positions get logit -inf, so probability 0.
"""
import triton
import triton.language as tl

from fastnl.kernels._launch import accumulator, bucket, dot_precision, padded_width, tuned
from fastnl.kernels._tiles import load_rows, store_rows

_CONFIGS = [
    triton.Config({"BLOCK_N": block_n, "BLOCK_M": block_m}, num_warps=warps, num_stages=stages)
    for block_n, block_m in ((32, 64), (64, 64), (64, 128), (128, 64), (32, 32))
    for warps, stages in ((4, 2), (8, 2))
]
_KEY = ["bucket_queries", "bucket_keys", "BLOCK_D", "BLOCK_E", "DOT_PRECISION"]
_INTERPRETER = {"BLOCK_N": 16, "BLOCK_M": 16}


def _live_values(meta):
    """Both sides' rows (q, dO and k, v), the transposed logits and dS tiles, and the
    gradient accumulators of the program's own side (bounded by the larger tile)."""
    widths = meta["BLOCK_D"] + meta["BLOCK_E"]
    tiles = meta["BLOCK_N"] + meta["BLOCK_M"]
    return tiles * widths + 2 * meta["BLOCK_N"] * meta["BLOCK_M"] + max(meta["BLOCK_N"], meta["BLOCK_M"]) * widths


@tuned([triton.Config({"BLOCK_R": 64}), triton.Config({"BLOCK_R": 128})], key=["BLOCK_E"],
       interpreter_config={"BLOCK_R": 16}, live_values=lambda meta: 3 * meta["BLOCK_R"] * meta["BLOCK_E"])
@triton.jit
def _delta_kernel(grad_out, out, center, delta, num_rows, width_v,
                  HAS_CENTER: tl.constexpr, ACC: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    feats = tl.arange(0, BLOCK_E)
    aggregate = load_rows(out, rows, num_rows, feats, width_v).to(ACC)
    if HAS_CENTER:
        aggregate += load_rows(center, rows, num_rows, feats, width_v).to(ACC)
    d_out = load_rows(grad_out, rows, num_rows, feats, width_v).to(ACC)
    tl.store(delta + rows, tl.sum(d_out * aggregate, axis=1), mask=rows < num_rows)


@tuned(_CONFIGS, key=_KEY, interpreter_config=_INTERPRETER, live_values=_live_values)
@triton.jit
def _key_value_grad_kernel(
    grad_out, query, key, value, log_normalizer, delta, grad_key, grad_value,
    num_queries, num_keys, width_qk, width_v, scale, bucket_queries, bucket_keys,
    ACC: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    batch = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims, feats = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_E)
    keys_at, values_at = batch * num_keys * width_qk, batch * num_keys * width_v
    k = load_rows(key + keys_at, cols, num_keys, dims, width_qk)
    v = load_rows(value + values_at, cols, num_keys, feats, width_v)
    query += batch * num_queries * width_qk
    grad_out += batch * num_queries * width_v
    log_normalizer += batch * num_queries
    delta += batch * num_queries
    d_key = tl.zeros((BLOCK_M, BLOCK_D), dtype=ACC)
    d_value = tl.zeros((BLOCK_M, BLOCK_E), dtype=ACC)
    for start in range(0, num_queries, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        row_ok = rows < num_queries
        q = load_rows(query, rows, num_queries, dims, width_qk)
        d_out = load_rows(grad_out, rows, num_queries, feats, width_v)
        row_log_normalizer = tl.load(log_normalizer + rows, mask=row_ok, other=0.0).to(ACC)
        row_delta = tl.load(delta + rows, mask=row_ok, other=0.0)
        # transposed tile (keys x queries): this program's keys are the rows
        logits = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION, out_dtype=ACC) * scale
        probs = tl.exp(tl.where(row_ok[None, :], logits, float("-inf")) - row_log_normalizer[None, :])
        d_value = tl.dot(probs.to(d_out.dtype), d_out, d_value, input_precision=DOT_PRECISION, out_dtype=ACC)
        d_probs = tl.dot(v, tl.trans(d_out), input_precision=DOT_PRECISION, out_dtype=ACC)
        d_logits = probs * (d_probs - row_delta[None, :])
        d_key = tl.dot(d_logits.to(q.dtype), q, d_key, input_precision=DOT_PRECISION, out_dtype=ACC)
    store_rows(grad_key + keys_at, d_key * scale, cols, num_keys, dims, width_qk)
    store_rows(grad_value + values_at, d_value, cols, num_keys, feats, width_v)


@tuned(_CONFIGS, key=_KEY, interpreter_config=_INTERPRETER, live_values=_live_values)
@triton.jit
def _query_grad_kernel(
    grad_out, query, key, value, log_normalizer, delta, grad_query,
    num_queries, num_keys, width_qk, width_v, scale, bucket_queries, bucket_keys,
    ACC: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    batch = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims, feats = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_E)
    row_ok = rows < num_queries
    queries_at = batch * num_queries * width_qk
    q = load_rows(query + queries_at, rows, num_queries, dims, width_qk)
    d_out = load_rows(grad_out + batch * num_queries * width_v, rows, num_queries, feats, width_v)
    row_log_normalizer = tl.load(log_normalizer + batch * num_queries + rows, mask=row_ok, other=0.0).to(ACC)
    row_delta = tl.load(delta + batch * num_queries + rows, mask=row_ok, other=0.0)
    key += batch * num_keys * width_qk
    value += batch * num_keys * width_v
    d_query = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC)
    for start in range(0, num_keys, BLOCK_M):
        cols = start + tl.arange(0, BLOCK_M)
        k = load_rows(key, cols, num_keys, dims, width_qk)
        v = load_rows(value, cols, num_keys, feats, width_v)
        logits = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION, out_dtype=ACC) * scale
        probs = tl.exp(tl.where((cols < num_keys)[None, :], logits, float("-inf")) - row_log_normalizer[:, None])
        d_probs = tl.dot(d_out, tl.trans(v), input_precision=DOT_PRECISION, out_dtype=ACC)
        d_logits = probs * (d_probs - row_delta[:, None])
        d_query = tl.dot(d_logits.to(k.dtype), k, d_query, input_precision=DOT_PRECISION, out_dtype=ACC)
    store_rows(grad_query + queries_at, d_query * scale, rows, num_queries, dims, width_qk)


def softmax_backward(grad_out, query, key, value, center, out, log_normalizer, scale,
                     delta, grad_query, grad_key, grad_value):
    """Fill grad_query, grad_key, grad_value (and the scratch delta, (B, N) accumulator dtype).

    All tensors contiguous; out is the forward's output (with the center subtracted
    for diffuse) and log_normalizer its (B, N) row log-sum-exp.
    """
    batch, num_queries, width_qk = query.shape
    num_keys, width_v = value.shape[1], value.shape[2]
    acc, block_d, block_e = accumulator(query.dtype), padded_width(width_qk), padded_width(width_v)
    num_rows = batch * num_queries
    _delta_kernel[lambda meta: (triton.cdiv(num_rows, meta["BLOCK_R"]),)](
        grad_out, out, center, delta, num_rows, width_v,
        HAS_CENTER=center is not None, ACC=acc, BLOCK_E=block_e,
    )
    sizes = (num_queries, num_keys, width_qk, width_v, scale, bucket(num_queries), bucket(num_keys))
    tiles = dict(ACC=acc, DOT_PRECISION=dot_precision(query.dtype), BLOCK_D=block_d, BLOCK_E=block_e)
    _key_value_grad_kernel[lambda meta: (triton.cdiv(num_keys, meta["BLOCK_M"]), batch)](
        grad_out, query, key, value, log_normalizer, delta, grad_key, grad_value, *sizes, **tiles,
    )
    _query_grad_kernel[lambda meta: (triton.cdiv(num_queries, meta["BLOCK_N"]), batch)](
        grad_out, query, key, value, log_normalizer, delta, grad_query, *sizes, **tiles,
    )
