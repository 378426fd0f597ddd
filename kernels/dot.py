"""The two products behind the dot kernel's O(N) path: row sums of outer products, and
rows times a small matrix.

sum_j (q_i.k_j) v_j = q_i^T (sum_j k_j v_j^T): the N x M affinity is never formed, only
a (D, E) state per batch. `outer_sum` builds such a state in chunks of rows (one
program per batch and chunk, partial states summed afterwards: no atomics, so the result
is deterministic); `rows_times` multiplies every row of a long (B, R, P) tensor by a
(B, P, Q) state. Both compute in the accumulator dtype with exact ("ieee") products:
they move O(N (D + E)) numbers and do as many flops, so they are memory-bound, and
tensor-core rounding would buy nothing.
"""
import torch
import triton
import triton.language as tl

from fastnl.kernels._launch import INTERPRET, accumulator, new_output, padded_width, tuned
from fastnl.kernels._tiles import load_rows, store_rows

_CHUNK_ROWS = 32 if INTERPRET else 512  # rows per program of outer_sum
_MAX_BLOCK_Q = 64  # rows_times splits wider states over programs: a 128 x 128 one spills


@tuned([triton.Config({}, num_warps=w) for w in (4, 8, 16)], key=["BLOCK_L", "BLOCK_RIGHT"],
       interpreter_config={},
       live_values=lambda meta: (meta["BLOCK_L"] + meta["BLOCK_R"]) * meta["BLOCK_RIGHT"]
       + meta["BLOCK_R"] * meta["BLOCK_L"])
@triton.jit
def _outer_sum_kernel(left, right, partial, num_rows, width_l, width_r,
                      ACC: tl.constexpr, CHUNK_ROWS: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_L: tl.constexpr, BLOCK_RIGHT: tl.constexpr):
    batch, chunk = tl.program_id(0).to(tl.int64), tl.program_id(1)
    cols_l, cols_r = tl.arange(0, BLOCK_L), tl.arange(0, BLOCK_RIGHT)
    left += batch * num_rows * width_l
    right += batch * num_rows * width_r
    state = tl.zeros((BLOCK_L, BLOCK_RIGHT), dtype=ACC)
    for start in range(chunk * CHUNK_ROWS, (chunk + 1) * CHUNK_ROWS, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        a = load_rows(left, rows, num_rows, cols_l, width_l).to(ACC)
        b = load_rows(right, rows, num_rows, cols_r, width_r).to(ACC)
        state = tl.dot(tl.trans(a), b, state, input_precision="ieee", out_dtype=ACC)
    partial += (batch * tl.num_programs(1) + chunk) * width_l * width_r
    store_rows(partial, state, cols_l, width_l, cols_r, width_r)


@tuned([triton.Config({"BLOCK_R": r}, num_warps=w) for r in (64, 128, 256, 32) for w in (4, 8)],
       key=["BLOCK_P", "BLOCK_Q"], interpreter_config={"BLOCK_R": 16},
       live_values=lambda meta: meta["BLOCK_R"] * (meta["BLOCK_P"] + meta["BLOCK_Q"])
       + meta["BLOCK_P"] * meta["BLOCK_Q"])
@triton.jit
def _rows_times_kernel(rows_in, state, out, num_rows, width_p, width_q, factor,
                       stride_sb, stride_sp, stride_sq,
                       ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr):
    batch = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols_p, cols_q = tl.arange(0, BLOCK_P), tl.program_id(2) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    x = load_rows(rows_in + batch * num_rows * width_p, rows, num_rows, cols_p, width_p).to(ACC)
    s = tl.load(state + batch * stride_sb + cols_p[:, None] * stride_sp + cols_q[None, :] * stride_sq,
                mask=(cols_p < width_p)[:, None] & (cols_q < width_q)[None, :], other=0.0).to(ACC)
    y = tl.dot(x, s, input_precision="ieee", out_dtype=ACC) * factor
    store_rows(out + batch * num_rows * width_q, y, rows, num_rows, cols_q, width_q)


def outer_sum(left, right):
    """(B, R, P), (B, R, Q) contiguous -> (B, P, Q) = sum_r left_r right_r^T, accumulator dtype."""
    batch, num_rows, width_l = left.shape
    width_r = right.shape[2]
    acc = accumulator(left.dtype)
    chunks = triton.cdiv(num_rows, _CHUNK_ROWS)
    partial = left.new_empty((batch, chunks, width_l, width_r),
                             dtype=torch.float64 if acc == tl.float64 else torch.float32)
    _outer_sum_kernel[(batch, chunks)](
        left, right, partial, num_rows, width_l, width_r,
        ACC=acc, CHUNK_ROWS=_CHUNK_ROWS, BLOCK_R=min(_CHUNK_ROWS, 64),
        BLOCK_L=padded_width(width_l), BLOCK_RIGHT=padded_width(width_r),
    )
    return partial.sum(dim=1)


def rows_times(rows, state, factor, out_dtype):
    """(B, R, P) contiguous, (B, P, Q) any strides -> factor * rows @ state, (B, R, Q) out_dtype."""
    batch, num_rows, width_p = rows.shape
    width_q = state.shape[2]
    out = new_output(rows, (batch, num_rows, width_q), out_dtype)
    block_q = min(padded_width(width_q), _MAX_BLOCK_Q)
    _rows_times_kernel[lambda meta: (triton.cdiv(num_rows, meta["BLOCK_R"]), batch, triton.cdiv(width_q, block_q))](
        rows, state, out, num_rows, width_p, width_q, factor, *state.stride(),
        ACC=accumulator(rows.dtype), BLOCK_P=padded_width(width_p), BLOCK_Q=block_q,
    )
    return out

