"""Tile loads shared by the Triton kernels (triton.jit functions, inlined by the caller)."""
import triton
import triton.language as tl


@triton.jit
def load_rows(base, rows, num_rows, cols, width):
    """The (len(rows), len(cols)) tile of a row-major (num_rows, width) matrix at base;
    positions past either edge read as 0, which leaves every dot product unchanged."""
    mask = (rows < num_rows)[:, None] & (cols < width)[None, :]
    return tl.load(base + rows[:, None] * width + cols[None, :], mask=mask, other=0.0)


@triton.jit
def store_rows(base, tile, rows, num_rows, cols, width):
    """Store a tile into a row-major (num_rows, width) matrix, converting to its dtype."""
    mask = (rows < num_rows)[:, None] & (cols < width)[None, :]
    tl.store(base + rows[:, None] * width + cols[None, :], tile.to(base.dtype.element_ty), mask=mask)
