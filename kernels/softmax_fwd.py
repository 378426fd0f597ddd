"""Forward of the softmax nonlocal operator: one pass over key tiles per query tile.

out_i = sum_j p_ij v_j [- c_i], p_ij = exp(scale q_i.k_j - log_normalizer_i), as in
FlashAttention-2: each program owns BLOCK_N query rows, streams the keys in tiles of
BLOCK_M, and keeps a running row maximum and sum (online softmax) so the N x M matrix
never exists. When the stage already knows the log_normalizer (KNOWN), the probabilities are final
on first sight: one pass, no rescaling. `diffuse` subtracts the center in the epilogue.
"""
import triton
import triton.language as tl

from fastnl.kernels._launch import accumulator, bucket, dot_precision, padded_width, tuned
from fastnl.kernels._tiles import load_rows, store_rows

# the first is "first"'s choice at the models' widths; the 32-row tiles serve width 128
_CONFIGS = [
    triton.Config({"BLOCK_N": block_n, "BLOCK_M": block_m}, num_warps=warps, num_stages=stages)
    for block_n in (64, 128, 32)
    for block_m in (64, 32, 128)
    for warps, stages in ((4, 2), (4, 3), (8, 2))
]


def _live_values(meta):
    """q, the accumulator and one logits tile per query tile; k, v per key tile."""
    widths = meta["BLOCK_D"] + meta["BLOCK_E"]
    return meta["BLOCK_N"] * (widths + meta["BLOCK_M"]) + meta["BLOCK_M"] * widths


@tuned(_CONFIGS, key=["bucket_keys", "BLOCK_D", "BLOCK_E", "KNOWN", "DOT_PRECISION"],
       interpreter_config={"BLOCK_N": 16, "BLOCK_M": 16}, live_values=_live_values)
@triton.jit
def _softmax_forward_kernel(
    query, key, value, center, out, log_normalizer,
    num_queries, num_keys, width_qk, width_v, scale, bucket_keys,
    HAS_CENTER: tl.constexpr, KNOWN: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    batch = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims, feats = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_E)
    row_ok = rows < num_queries
    key += batch * num_keys * width_qk
    value += batch * num_keys * width_v
    q = load_rows(query + batch * num_queries * width_qk, rows, num_queries, dims, width_qk)
    acc = tl.zeros((BLOCK_N, BLOCK_E), dtype=ACC)
    if KNOWN:
        row_log_normalizer = tl.load(log_normalizer + batch * num_queries + rows, mask=row_ok, other=0.0).to(ACC)
    else:
        row_max = tl.full((BLOCK_N,), float("-inf"), dtype=ACC)
        row_sum = tl.zeros((BLOCK_N,), dtype=ACC)
    for start in range(0, num_keys, BLOCK_M):
        cols = start + tl.arange(0, BLOCK_M)
        k = load_rows(key, cols, num_keys, dims, width_qk)
        v = load_rows(value, cols, num_keys, feats, width_v)
        logits = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION, out_dtype=ACC) * scale
        logits = tl.where((cols < num_keys)[None, :], logits, float("-inf"))
        if KNOWN:
            probs = tl.exp(logits - row_log_normalizer[:, None])
        else:
            new_max = tl.maximum(row_max, tl.max(logits, axis=1))
            # running max changed: rescale what was accumulated under the old one
            correction = tl.exp(row_max - new_max)
            probs = tl.exp(logits - new_max[:, None])
            row_sum = row_sum * correction + tl.sum(probs, axis=1)
            acc = acc * correction[:, None]
            row_max = new_max
        acc = tl.dot(probs.to(v.dtype), v, acc, input_precision=DOT_PRECISION, out_dtype=ACC)
    if not KNOWN:
        acc = acc / row_sum[:, None]
        tl.store(log_normalizer + batch * num_queries + rows, row_max + tl.log(row_sum), mask=row_ok)
    rows_at = batch * num_queries * width_v
    if HAS_CENTER:
        acc -= load_rows(center + rows_at, rows, num_queries, feats, width_v).to(ACC)
    store_rows(out + rows_at, acc, rows, num_queries, feats, width_v)


def softmax_forward(query, key, value, center, scale, out, log_normalizer, known):
    """Fill out (B, N, E); read log_normalizer (B, N) when known, else fill it.

    query (B, N, D), key (B, M, D), value (B, M, E), center (B, N, E) or None, all
    contiguous and of one dtype; log_normalizer (B, N) in the accumulator dtype.
    """
    batch, num_queries, width_qk = query.shape
    num_keys, width_v = value.shape[1], value.shape[2]
    grid = lambda meta: (triton.cdiv(num_queries, meta["BLOCK_N"]), batch)  # noqa: E731
    _softmax_forward_kernel[grid](
        query, key, value, center, out, log_normalizer,
        num_queries, num_keys, width_qk, width_v, scale, bucket(num_keys),
        HAS_CENTER=center is not None, KNOWN=known, ACC=accumulator(query.dtype),
        DOT_PRECISION=dot_precision(query.dtype), BLOCK_D=padded_width(width_qk), BLOCK_E=padded_width(width_v),
    )
