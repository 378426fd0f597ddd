"""fastnl.linear_parts (the modules' theta, phi and first g as one projection on CPU rows,
each part contiguous) against F.linear in float64: every part and every gradient in
float64 and float32, gradcheck, opcheck, thread-count determinism, the fallback (autocast,
bfloat16 rows) and the checks."""
import pytest
import torch
import torch.nn.functional as F
from harness import on_one_and_two_threads

from fastnl import backends, linear_parts

pytestmark = pytest.mark.skipif(backends.unavailable_reason("cpp", "cpu") is not None,
                                reason="the cpp backend did not build")

# (R, P, widths): tiny, odd widths below a vector of 16 floats, parts off the vector
# boundaries, one part wider than two vectors, a row chunk (256 rows) and past it, and
# the model's stage-2 shape (theta, phi and g of 32 channels)
SHAPES = [(3, 2, [1, 2]), (255, 5, [3, 4, 2]), (513, 17, [5, 7, 9]), (300, 32, [40]), (17, 3, [33, 1]),
          (32768, 32, [16, 16, 16])]
# max |error| / max |truth| against float64: float32 a few ulps of the largest terms
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5}


def make(shape, dtype, seed=0):
    """Rows (R, P), weight (Q, P), bias (Q) and the parts' gradients in `dtype`, all
    drawn in float64."""
    rows_count, width, widths = shape
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(rows_count, width, generator=generator, dtype=torch.float64)
    weight = torch.randn(sum(widths), width, generator=generator, dtype=torch.float64) / width ** 0.5
    bias = torch.randn(sum(widths), generator=generator, dtype=torch.float64)
    grads = [torch.randn(rows_count, w, generator=generator, dtype=torch.float64) for w in widths]
    return rows.to(dtype), weight.to(dtype), bias.to(dtype), [g.to(dtype) for g in grads]


def run(function, rows, weight, bias, grads, widths):
    """The parts and the gradients of rows, weight and bias."""
    leaves = [t.detach().clone().requires_grad_() for t in (rows, weight, bias)]
    outs = function(*leaves, widths)
    found = torch.autograd.grad(outs, leaves, grads)
    return [out.detach() for out in outs], list(found)


def truth(rows, weight, bias, grads, widths):
    """F.linear in float64, split."""
    def split_linear(rows, weight, bias, widths):
        return F.linear(rows, weight, bias).split(widths, dim=-1)

    return run(split_linear, rows.double(), weight.double(), bias.double(), [g.double() for g in grads], widths)


def fused(rows, weight, bias, grads, widths):
    return run(linear_parts._forward, rows, weight, bias, grads, widths)


def assert_matches(dtype, got, expected, widths):
    outs, grads = got
    for index, (out, exact) in enumerate(zip(outs, expected[0])):
        assert out.dtype == dtype and out.shape == (exact.shape[0], widths[index]) and out.is_contiguous()
        error = (out.double() - exact).abs().max().item() / exact.abs().max().item()
        assert error <= TOLERANCE[dtype], f"part {index}: relative error {error:.2e}"
    for name, grad, exact in zip(("rows", "weight", "bias"), grads, expected[1]):
        assert grad.shape == exact.shape, name
        error = (grad.double() - exact).abs().max().item() / exact.abs().max().item()
        assert error <= TOLERANCE[dtype], f"grad of {name}: relative error {error:.2e}"


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_parts_and_gradients_match_float64(shape, dtype):
    rows, weight, bias, grads = make(shape, dtype)
    widths = shape[2]
    assert_matches(dtype, fused(rows, weight, bias, grads, widths), truth(rows, weight, bias, grads, widths), widths)


def test_bitwise_the_same_on_one_and_two_threads():
    shape = (3000, 17, [16, 9, 16])
    rows, weight, bias, grads = make(shape, torch.float32)

    def results():
        outs, found = fused(rows, weight, bias, grads, shape[2])
        return [*outs, *found]

    on_one_and_two_threads(results)


def test_wide_operands_sum_several_row_chunks_a_work_item():
    """Gradients (R, 128) against rows (R, 512): the backward's partial sums would pass
    their budget (row_products.h's kPartialSums) at one work item per 256 rows, so each
    sums several; the result is the same as in float64."""
    rows, weight, bias, grads = make((17000, 512, [64, 64]), torch.float32)
    expected = truth(rows, weight, bias, grads, [64, 64])
    assert_matches(torch.float32, fused(rows, weight, bias, grads, [64, 64]), expected, [64, 64])


def test_parts_take_any_strides_and_one_row_as_f_linear_does():
    rows, weight, bias, _ = make((30, 6, [2, 4]), torch.float32)
    weight_t = weight.t().contiguous().t()  # (Q, P) in transposed strides
    strided_bias = torch.stack([bias, bias], dim=1)[:, 0]
    for args in ((rows, weight_t, strided_bias), (rows[0], weight, bias)):
        got = linear_parts.parts(*args, [2, 4])
        for part, exact in zip(got, F.linear(*args).split([2, 4], dim=-1)):
            assert part.is_contiguous()
            torch.testing.assert_close(part, exact, rtol=1e-5, atol=1e-5)


def test_gradcheck():
    rows, weight, bias, _ = make((20, 3, [2, 1, 3]), torch.float64)
    inputs = [t.requires_grad_() for t in (rows, weight, bias)]
    assert torch.autograd.gradcheck(lambda *args: tuple(linear_parts._forward(*args, [2, 1, 3])), inputs)


def test_opcheck():
    rows, weight, bias, grads = make((40, 5, [3, 2]), torch.float32)
    torch.library.opcheck(linear_parts._forward, (rows, weight.requires_grad_(), bias.requires_grad_(), [3, 2]))
    torch.library.opcheck(linear_parts._backward, (grads, rows, weight.detach()))


def test_an_unused_part_gets_a_zero_gradient():
    rows, weight, bias, _ = make((50, 4, [3, 2]), torch.float64)
    rows.requires_grad_()
    theta, _ = linear_parts._forward(rows, weight, bias, [3, 2])
    grad = torch.randn_like(theta)
    expected = grad @ weight[:3]
    torch.testing.assert_close(torch.autograd.grad(theta, rows, grad)[0], expected)


def test_parts_of_batched_rows():
    rows, weight, bias, _ = make((2 * 64, 8, [4, 4]), torch.float32)
    rows = rows.view(2, 64, 8)
    got = linear_parts.parts(rows, weight, bias, [4, 4])
    for part, exact in zip(got, F.linear(rows.double(), weight.double(), bias.double()).split([4, 4], dim=-1)):
        assert part.shape == (2, 64, 4) and part.is_contiguous()
        torch.testing.assert_close(part.double(), exact, rtol=1e-5, atol=1e-5)


def test_no_rows():
    rows = torch.randn(0, 4, 8, 5, requires_grad=True)
    weight, bias = torch.randn(7, 5, requires_grad=True), torch.randn(7, requires_grad=True)
    got = linear_parts.parts(rows, weight, bias, [3, 4])
    assert [part.shape for part in got] == [(0, 4, 8, 3), (0, 4, 8, 4)]
    grads = torch.autograd.grad(got, [rows, weight, bias], [torch.ones_like(part) for part in got])
    assert grads[0].shape == rows.shape and not grads[1].any() and not grads[2].any()


@pytest.mark.parametrize("case", ["bfloat16 autocast", "bfloat16 rows", "float16 rows"])
def test_parts_fall_back_to_one_linear_where_the_operator_does_not_apply(case):
    """F.linear split, each part contiguous all the same, under autocast as it casts."""
    rows, weight, bias, _ = make((30, 6, [2, 4]), torch.float32)
    if case != "bfloat16 autocast":
        dtype = torch.bfloat16 if case == "bfloat16 rows" else torch.float16
        rows, weight, bias = rows.to(dtype), weight.to(dtype), bias.to(dtype)
        assert not linear_parts.applies(rows, weight, bias)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "bfloat16 autocast"):
        got = linear_parts.parts(rows, weight, bias, [2, 4])
        expected = F.linear(rows, weight, bias).split([2, 4], dim=-1)
    for part, exact in zip(got, expected):
        assert part.is_contiguous() and part.dtype == exact.dtype and torch.equal(part, exact)


@pytest.mark.parametrize(("change", "message"), [
    ("weight width", "weight"), ("widths sum", "weight"), ("zero width", "width above 0"), ("bias dtype", "bias"),
    ("rows dims", "rows must be"), ("rows dtype", "float32 or float64"),
])
def test_bad_operands_raise(change, message):
    rows, weight, bias, _ = make((10, 4, [2, 3]), torch.float32)
    widths = [2, 3]
    if change == "weight width":
        weight = weight[:, :3].contiguous()
    elif change == "widths sum":
        widths = [2, 2]
    elif change == "zero width":
        widths = [0, 5]
    elif change == "bias dtype":
        bias = bias.double()
    elif change == "rows dtype":
        rows = rows.bfloat16()
    else:
        rows = rows[None]
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fastnl_cpp.linear_parts_forward(rows, weight, bias, widths)
