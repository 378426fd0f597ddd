"""What is particular to the cpp backend (csrc/cpu): determinism across thread counts,
strides, the denormal mode, its operators' own checks, the build fallback, and the
native bfloat16 softmax (AMX tiles or vdpbf16ps) with its float32 fallback. Its comparison with
the reference, tile edges included, is tests/test_backends.py's.

The first run compiles the kernels (torch's extension cache keeps them).
"""
import warnings

import pytest
import torch
from harness import (
    NAMES,
    assert_matches_reference,
    assert_within_statistic_rounding,
    backend_results,
    make_inputs,
    on_one_and_two_threads,
)

import fastnl
from fastnl import affinities, backends, reference
from fastnl.backends import cpp

pytestmark = pytest.mark.skipif(backends.unavailable_reason("cpp", "cpu") is not None,
                                reason="the cpp backend did not build")

KERNELS = affinities.names()  # every registered kernel

# the native kernels' two kinds of bf16 products, as bfloat16_path() names them
PRODUCTS = ["amx", "avx512-bf16"]


def choose_products(monkeypatch, products):
    """The native kernels chosen (FASTNL_CPP_BFLOAT16=native), their products on AMX tiles
    or, with oneDNN turned off, on vdpbf16ps; skipped where this CPU has no such path."""
    if not cpp._bfloat16_kernels():
        pytest.skip(f"no native bfloat16 here: {cpp.bfloat16_path()}")
    if products == "amx" and not cpp._bfloat16_amx():
        pytest.skip("no AMX products here (no AMX, or oneDNN disabled)")
    monkeypatch.setenv(cpp.BFLOAT16_CHOICE, "native")
    if products == "avx512-bf16":
        monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    assert cpp.bfloat16_path() == products


def forward_backward(inputs, kernel):
    """[out, grads] of diffuse on the cpp backend for (query, key, value, center, grad_out)."""
    return backend_results(kernel, "diffuse", "cpp", *inputs, 0.5)


@pytest.mark.parametrize("kernel, dtype, products", [(kernel, torch.float32, None) for kernel in KERNELS]
                         + [("softmax", torch.bfloat16, products) for products in PRODUCTS], ids=str)
def test_one_and_two_threads_agree_bitwise(kernel, dtype, products, monkeypatch):
    """Work is split by shape, never by thread count, and summed in a fixed order
    (bfloat16: on the native kernels, with either kind of products)."""
    if dtype == torch.bfloat16:
        choose_products(monkeypatch, products)
    def results():
        return [tensor for shape in [(1, 700, 650, 8, 16), (3, 130, 300, 16, 48), (16, 40, 50, 8, 16)]
                for tensor in forward_backward(make_inputs(shape, dtype, kernel=kernel), kernel)]

    assert all(tensor.dtype == dtype for tensor in on_one_and_two_threads(results))


@pytest.mark.parametrize("kernel", KERNELS)
def test_non_contiguous_inputs(kernel):
    inputs = make_inputs((2, 50, 40, 8, 16), torch.float32, kernel=kernel)
    # the same values at every other element of a twice-as-wide buffer
    strided = [torch.stack([t, t], dim=-1).flatten(-2)[..., ::2] for t in inputs]
    assert not any(t.is_contiguous() for t in strided)
    for got, expected in zip(forward_backward(strided, kernel), forward_backward(inputs, kernel)):
        assert torch.equal(got, expected)


# the softmax's operand types, bf16 on the native kernels with each kind of products
SOFTMAX_OPERANDS = [(torch.float32, None), (torch.float64, None)] + [(torch.bfloat16, kind) for kind in PRODUCTS]


@pytest.mark.parametrize("dtype, products", SOFTMAX_OPERANDS, ids=str)
@pytest.mark.parametrize("scale", [-0.7, 0.0, 0.7])
def test_sharp_logits_of_either_sign(dtype, products, scale, monkeypatch):
    """Logits up to about +-140 (query and key x 3, D = 16), past float32's exp range: each
    query's running maximum must be that of the scaled logits, the products' minimum under
    a negative scale, or exps overflow. Every output finite, and against the float64 truth:
    by the harness's rule, or in float32 within |log_normalizer| eps(float32), the error
    of the stored row statistic (as test_backends.test_large_logits_float32)."""
    if products:
        choose_products(monkeypatch, products)
    inputs = make_inputs((2, 150, 260, 16, 16), dtype, magnitude=3.0)
    results = backend_results("softmax", "diffuse", "cpp", *inputs, scale)
    assert all(torch.isfinite(result).all() for result in results)
    if dtype != torch.float32:
        assert_matches_reference(results, "softmax", "diffuse", *inputs, scale)
        return
    truth = backend_results("softmax", "diffuse", "reference", *inputs, scale, dtype=torch.float64)
    max_logit = abs(scale) * (inputs[0].double() @ inputs[1].double().transpose(1, 2)).abs().max().item()
    for name, actual, expected in zip(NAMES, results, truth):
        assert_within_statistic_rounding(actual, expected, max_logit, name)


@pytest.mark.parametrize("dtype, products", SOFTMAX_OPERANDS, ids=str)
def test_a_negative_scale_is_the_negated_query_bitwise(dtype, products, monkeypatch):
    """(q, -s) and (-q, s) have the same logits, bit for bit, in every kernel: the same
    out, log_normalizer, dK and dV, and dQ negated."""
    if products:
        choose_products(monkeypatch, products)
    ops = torch.ops.fastnl_cpp
    query, key, value, center, grad_out = make_inputs((2, 150, 260, 16, 16), dtype)
    out, log_normalizer = ops.softmax_forward(query, key, value, center, None, -0.7)
    flipped_out, flipped_log_normalizer = ops.softmax_forward(-query, key, value, center, None, 0.7)
    assert torch.equal(out, flipped_out) and torch.equal(log_normalizer, flipped_log_normalizer)
    grad_query, grad_key, grad_value = ops.softmax_backward(grad_out, query, key, value, center, out, log_normalizer,
                                                            -0.7)
    flipped = ops.softmax_backward(grad_out, -query, key, value, center, out, log_normalizer, 0.7)
    assert torch.equal(grad_query, -flipped[0]) and torch.equal(grad_key, flipped[1])
    assert torch.equal(grad_value, flipped[2])


def test_denormal_mode_is_restored_after_the_kernels():
    # the softmax kernels flush denormals on their threads (tile_math.h, FlushDenormals);
    # the caller's thread, which runs a share of the work, must get its mode back
    forward_backward(make_inputs((2, 90, 70, 8, 16), torch.float32, magnitude=30.0), "softmax")
    tiny = torch.tensor([1e-39])  # a denormal float32
    assert (tiny * 2).item() == pytest.approx(2e-39, rel=1e-6)


def test_operator_checks_name_the_argument():
    query, key, value, _, _ = make_inputs((2, 5, 6, 8, 4), torch.float32)
    with pytest.raises(RuntimeError, match="key must have shape"):
        torch.ops.fastnl_cpp.softmax_forward(query, key[:, :, :3], value, None, None, 1.0)
    with pytest.raises(RuntimeError, match="query must be float32 or float64"):
        torch.ops.fastnl_cpp.dot_forward(query.half(), key.half(), value.half(), None, 1.0)
    with pytest.raises(RuntimeError, match="log_normalizer must have shape"):
        torch.ops.fastnl_cpp.softmax_forward(query, key, value, None, torch.zeros(2, 4), 1.0)


def test_other_devices_are_unavailable():
    assert "CPU" in cpp.unavailable_reason("cuda")
    assert cpp.unavailable_reason("cpu") is None


@pytest.fixture
def broken_build(monkeypatch):
    """The loader fails as a missing compiler would; the real state comes back after."""

    def fail(verbose=False):
        raise RuntimeError("Error building extension: no C++ compiler found")

    def forget():
        cpp._build_failure.cache_clear()
        backends.unavailable_reason.cache_clear()

    monkeypatch.setattr(cpp, "build", fail)
    forget()
    yield
    monkeypatch.undo()
    forget()


def test_failed_build_falls_back_to_torch_with_one_warning(broken_build):
    query, key, value, _, _ = make_inputs((1, 6, 6, 8, 4), torch.float32)
    with pytest.warns(RuntimeWarning, match="no C[+][+] compiler found.*\n.*falling back to the 'torch' backend"):
        assert backends.resolve(None, "cpu") == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time is silent
        out = fastnl.nonlocal_aggregate(query, key, value)
    torch.testing.assert_close(out, reference.aggregate(query, key, value))
    with pytest.raises(RuntimeError, match="backend 'cpp' is not available on cpu: building the C[+][+]"):
        fastnl.nonlocal_aggregate(query, key, value, backend="cpp")


# --- bfloat16 -------------------------------------------------------------------------


@pytest.fixture(params=PRODUCTS)
def native_bfloat16(request, monkeypatch):
    """The native kernels chosen, once with each kind of products."""
    choose_products(monkeypatch, request.param)


def native_only(test):
    """`test` on the native kernels, once per kind of products; skipped where none are built."""
    return pytest.mark.usefixtures("native_bfloat16")(test)


# The paper's three stages at reduced B: (B, N, M, D, E)
MODEL_SHAPES = [(2, 1024, 1024, 8, 8), (4, 256, 256, 16, 16), (8, 64, 64, 32, 32)]
# max |error vs the float64 truth| / max |truth| allowed in bf16 (softmax diffuse, scale 1),
# about twice the worst measured at MODEL_SHAPES: one rounding of the result is 2^-9 = 2e-3
# of its largest entries; the gradients sum products of rounded P and dS (fastnl.reference
# in bf16 errs 1e-2 to 2e-2 on them). grad_center = -grad_out is exact (the truth's own
# float64 row sums err 1e-15).
BFLOAT16_TOLERANCE = {"out": 5e-3, "grad_query": 1.5e-2, "grad_key": 1.5e-2, "grad_value": 6e-3, "grad_center": 1e-12}


@pytest.fixture
def float32_bfloat16(monkeypatch):
    """The fallback: the CPU without AVX512-BF16, as far as the backend can tell."""
    monkeypatch.setattr(cpp, "_bfloat16_kernels", lambda: False)


def test_bfloat16_path_follows_the_cpu_and_the_choice(monkeypatch):
    """Unset: native where its products run on AMX or vdpbf16ps is fast, else float32;
    "native" where the CPU has AVX512-BF16 under an AVX512 build, on AMX or (oneDNN off)
    vdpbf16ps; "float32" when chosen; without the kernels float32 with the reason."""
    monkeypatch.delenv(cpp.BFLOAT16_CHOICE, raising=False)
    if cpp._bfloat16_unbuildable() is None:
        assert torch.ops.fastnl_cpp.bfloat16_native()
        speedup = cpp.bfloat16_dot_speedup()
        slow = (f"float32 (the default without AMX where vdpbf16ps is slow, here {speedup:.2f}x the float32 FMA "
                f"rate: {cpp.BFLOAT16_CHOICE}=native selects the AVX512-BF16 kernels)")
        without_amx = "avx512-bf16" if speedup >= cpp._NATIVE_DOT_SPEEDUP else slow
        amx = cpp._bfloat16_amx()
        assert cpp.bfloat16_path() == ("amx" if amx else without_amx)
        with monkeypatch.context() as without_onednn:
            without_onednn.setattr(torch.backends.mkldnn, "enabled", False)
            assert not cpp._bfloat16_amx() and cpp.bfloat16_path() == without_amx
            without_onednn.setenv(cpp.BFLOAT16_CHOICE, "native")
            assert cpp.bfloat16_path() == "avx512-bf16"
        monkeypatch.setenv(cpp.BFLOAT16_CHOICE, "native")
        assert cpp.bfloat16_path() == ("amx" if amx else "avx512-bf16")
        monkeypatch.setenv(cpp.BFLOAT16_CHOICE, "float32")
        assert cpp.bfloat16_path() == f"float32 (chosen by {cpp.BFLOAT16_CHOICE}=float32)"
    else:
        assert cpp.bfloat16_path() == f"float32 ({cpp._bfloat16_unbuildable()})"
    monkeypatch.setenv(cpp.BFLOAT16_CHOICE, "fast")
    with pytest.raises(ValueError, match="FASTNL_CPP_BFLOAT16 must be 'float32' or 'native'"):
        cpp.bfloat16_path()


@pytest.mark.parametrize("speedup, path", [(0.5, "float32"), (2.0, "avx512-bf16")])
def test_without_amx_the_default_follows_the_measured_dot_rate(speedup, path, monkeypatch):
    """Without AMX (oneDNN off), unset chooses native exactly where vdpbf16ps has at
    least the float32 FMA's FLOP rate: half (a Sapphire Rapids) converts, twice (a Zen 4)
    runs native."""
    if not cpp._bfloat16_kernels():
        pytest.skip(f"no native bfloat16 here: {cpp.bfloat16_path()}")
    monkeypatch.delenv(cpp.BFLOAT16_CHOICE, raising=False)
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    monkeypatch.setattr(cpp, "bfloat16_dot_speedup", lambda: speedup)
    assert cpp.bfloat16_path().startswith(path)
    assert (f"{speedup:.2f}x" in cpp.bfloat16_path()) == (path == "float32")


def test_the_dot_rate_is_measured_where_the_kernels_run():
    """A positive, finite ratio where the bfloat16 kernels are built and runnable, 0
    elsewhere."""
    measured = float(torch.ops.fastnl_cpp.bfloat16_dot_speedup())
    if not cpp._bfloat16_kernels():
        assert measured == 0.0 and cpp.bfloat16_dot_speedup() == 0.0
        return
    again = float(torch.ops.fastnl_cpp.bfloat16_dot_speedup())
    assert 0.05 < measured < 20 and 0.05 < again < 20
    assert 0.05 < cpp.bfloat16_dot_speedup() < 20


def test_the_exp_rate_is_a_core_s_rate(monkeypatch):
    """The kernels' exps per second on one core: below 16 lanes at 10 GHz (a loop the
    compiler had dropped would read far more), above 10^8; 0 without the kernels."""
    rates = [cpp.exp_rate() for _ in range(2)]
    assert all(1e8 < rate < 1.6e11 for rate in rates), rates
    monkeypatch.setattr(cpp, "_build_failure", lambda: "no compiler")
    assert cpp.exp_rate() == 0.0


@native_only
@pytest.mark.parametrize("shape", MODEL_SHAPES, ids=str)
def test_bfloat16_model_shapes_per_output(shape):
    inputs = make_inputs(shape, torch.bfloat16)
    results = backend_results("softmax", "diffuse", "cpp", *inputs, 1.0)
    truth = backend_results("softmax", "diffuse", "reference", *inputs, 1.0, dtype=torch.float64)
    for name, actual, exact in zip(NAMES, results, truth):
        assert actual.dtype == torch.bfloat16, name
        error = (actual.double() - exact).abs().max().item() / exact.abs().max().item()
        assert error <= BFLOAT16_TOLERANCE[name], f"{name}: relative error {error:.2e}"
    assert_matches_reference(results, "softmax", "diffuse", *inputs, 1.0)  # and the harness's rule


@native_only
@pytest.mark.parametrize("shape", [(2, 129, 67, 16, 16), (2, 33, 41, 7, 5), (1, 97, 301, 32, 24), (2, 300, 263, 6, 4),
                                   (16, 131, 259, 16, 16)], ids=str)
def test_bfloat16_odd_sizes(shape):
    """N, M off the tiles and odd; odd D and E leave a contraction's last pair half empty
    (on AMX they take vdpbf16ps); even D, E narrower than a vector pad the products;
    B = 16 has one query group a batch, past a 128-row and a 256-key bf16 tile."""
    inputs = make_inputs(shape, torch.bfloat16)
    assert_matches_reference(backend_results("softmax", "diffuse", "cpp", *inputs, 0.7), "softmax", "diffuse",
                             *inputs, 0.7)


@native_only
def test_bfloat16_stage_path():
    """A stage's later blocks: the log_normalizer (float32) of the first call given back."""
    query, key, value, center, grad_out = make_inputs((2, 150, 260, 16, 16), torch.bfloat16)
    _, log_normalizer = fastnl.nonlocal_attend(query, key, value, center, backend="cpp")
    assert log_normalizer.dtype == torch.float32
    truth = torch.logsumexp(query.double() @ key.double().transpose(1, 2), dim=-1)
    torch.testing.assert_close(log_normalizer.double(), truth, rtol=0, atol=1e-5)
    results = backend_results("softmax", "aggregate", "cpp", query, key, value, None, grad_out, 1.0,
                              log_normalizer=log_normalizer)
    assert_matches_reference(results, "softmax", "aggregate", query, key, value, None, grad_out, 1.0)
    results = backend_results("softmax", "diffuse", "cpp", query, key, value, center, grad_out, 1.0,
                              log_normalizer=log_normalizer)
    assert_matches_reference(results, "softmax", "diffuse", query, key, value, center, grad_out, 1.0)


def test_bfloat16_fallback_computes_in_float32(float32_bfloat16):
    """Without AVX512-BF16: the float32 kernels on the converted operands, each result rounded once."""
    assert cpp.bfloat16_path().startswith("float32 (")
    query, key, value, center, grad_out = make_inputs((2, 100, 77, 8, 16), torch.bfloat16)
    operands = [t.float() for t in (query, key, value, center)]
    out, log_normalizer = cpp.softmax_forward(query, key, value, center, None, 0.5)
    out_float32, log_normalizer_float32 = torch.ops.fastnl_cpp.softmax_forward(*operands, None, 0.5)
    assert torch.equal(out, out_float32.bfloat16()) and torch.equal(log_normalizer, log_normalizer_float32)
    grads = cpp.softmax_backward(grad_out, query, key, value, center, out, log_normalizer, 0.5)
    grads_float32 = torch.ops.fastnl_cpp.softmax_backward(grad_out.float(), *operands, out.float(), log_normalizer,
                                                          0.5)
    for got, expected in zip(grads, grads_float32):
        assert got.dtype == torch.bfloat16 and torch.equal(got, expected.bfloat16())
    inputs = (query, key, value, center, grad_out)
    assert_matches_reference(forward_backward(inputs, "softmax"), "softmax", "diffuse", *inputs, 0.5)


@native_only
def test_bfloat16_native_is_not_the_float32_path(monkeypatch):
    """The native path rounds P and dS to bf16 as operands: its results differ from the
    float32 computation's, and both meet the tolerance."""
    inputs = make_inputs((2, 100, 77, 8, 16), torch.bfloat16)
    native = forward_backward(inputs, "softmax")
    monkeypatch.setattr(cpp, "_bfloat16_native", lambda: False)
    converted = forward_backward(inputs, "softmax")
    assert not all(torch.equal(a, b) for a, b in zip(native, converted))
    for results in (native, converted):
        assert_matches_reference(results, "softmax", "diffuse", *inputs, 0.5)


@native_only
def test_bfloat16_operator_checks():
    query, key, value, _, _ = make_inputs((2, 5, 6, 8, 4), torch.bfloat16)
    with pytest.raises(RuntimeError, match="log_normalizer must have dtype Float"):
        torch.ops.fastnl_cpp.softmax_forward(query, key, value, None, torch.zeros(2, 5, dtype=torch.bfloat16), 1.0)
    with pytest.raises(RuntimeError, match="query must be float32, float64 or bfloat16"):
        torch.ops.fastnl_cpp.softmax_forward(query.half(), key.half(), value.half(), None, None, 1.0)
