"""Bad input gets a clear error naming the argument; NaN propagates; empty is fine."""
import pytest
import torch
from harness import cpu_backends

import fastnl
from fastnl import affinities, reference


def operands(batch=2, num_queries=5, num_keys=5, width=4, value_width=3, dtype=torch.float32):
    return (
        torch.randn(batch, num_queries, width, dtype=dtype),
        torch.randn(batch, num_keys, width, dtype=dtype),
        torch.randn(batch, num_keys, value_width, dtype=dtype),
    )


BAD_INPUTS = [
    # (description, (query, key, value, center), kwargs, error type, words in the message)
    ("batch", (torch.randn(2, 5, 4), torch.randn(3, 5, 4), torch.randn(3, 5, 3), None), {}, ValueError, "batch"),
    ("width D", (torch.randn(2, 5, 4), torch.randn(2, 5, 6), torch.randn(2, 5, 3), None), {}, ValueError, "D="),
    ("value M", (torch.randn(2, 5, 4), torch.randn(2, 5, 4), torch.randn(2, 6, 3), None), {}, ValueError,
     "value has M"),
    ("center E", (*operands(), torch.randn(2, 5, 7)), {}, ValueError, "center must have shape"),
    ("concat D", (*operands(), None), {"kernel": "concat"}, ValueError, "D=1"),
    ("integers", (torch.ones(2, 5, 4, dtype=torch.int64), *operands()[1:], None), {}, TypeError,
     "query must have a floating"),
    ("mixed dtypes", (*operands()[:2], torch.randn(2, 5, 3, dtype=torch.float64), None), {}, TypeError,
     "share one dtype"),
    ("2-d query", (torch.randn(5, 4), *operands()[1:], None), {}, ValueError, "query must have 3 dimensions"),
    ("no keys", (torch.randn(2, 5, 4), torch.randn(2, 0, 4), torch.randn(2, 0, 3), torch.randn(2, 5, 3)), {},
     ValueError, "M = 0"),
    ("no width", (torch.randn(2, 5, 0), torch.randn(2, 5, 0), torch.randn(2, 5, 3), None), {}, ValueError, "D = 0"),
    ("kernel", (*operands(), None), {"kernel": "cosine"}, ValueError, "kernel must be one of"),
    ("scale", (*operands(), None), {"scale": float("nan")}, ValueError, "scale must be a finite"),
    ("backend", (*operands(), None), {"backend": "fortran"}, ValueError, "unknown backend 'fortran'"),
    ("not a tensor", ([[1.0]], *operands()[1:], None), {}, TypeError, "query must be a torch.Tensor"),
]


@pytest.mark.parametrize("args, kwargs, error, words", [case[1:] for case in BAD_INPUTS],
                         ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_a_clear_error(args, kwargs, error, words):
    with pytest.raises(error, match=words.replace("(", r"\(")):
        fastnl.nonlocal_attend(*args, **kwargs)


def test_diffuse_without_a_center_is_a_clear_error():
    """None means "no center" only in nonlocal_attend; diffuse names what to pass instead."""
    with pytest.raises(TypeError, match="needs a center.*pass value"):
        fastnl.nonlocal_diffuse(*operands(), None)


def test_wrong_log_normalizer_is_a_clear_error():
    query, key, value = operands()
    with pytest.raises(ValueError, match=r"log_normalizer must have shape \(B, N\) = \(2, 5\)"):
        fastnl.nonlocal_attend(query, key, value, log_normalizer=torch.zeros(2, 4))


def test_mixed_devices_is_a_clear_error():
    query, key, value = operands()
    with pytest.raises(ValueError, match="one device"):
        fastnl.nonlocal_aggregate(query, key, value.to("meta"))


def test_unavailable_backend_is_a_clear_error():
    query, key, value = operands()
    with pytest.raises((RuntimeError, ValueError), match="cuda"):
        fastnl.nonlocal_aggregate(query, key, value, backend="cuda")


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("kernel", affinities.names())
@pytest.mark.parametrize("where", ["query", "key", "value"])
def test_nan_in_gives_nan_out(backend, kernel, where):
    width = affinities.get(kernel).width_qk or 4
    query, key, value = operands(width=width, num_keys=6, dtype=torch.float64)
    {"query": query, "key": key, "value": value}[where][1, 2, 0] = float("nan")
    out = fastnl.nonlocal_aggregate(query, key, value, kernel=kernel, backend=backend)
    expected = reference.aggregate(query, key, value, kernel=kernel)
    assert torch.isnan(out).any() and not torch.isnan(out[0]).any()  # batch 0 untouched
    if where == "query":
        assert torch.isnan(out[1, 2]).all()
    assert torch.equal(torch.isnan(out), torch.isnan(expected))
    finite = ~torch.isnan(out)
    torch.testing.assert_close(out[finite], expected[finite])


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("kernel", affinities.names())
@pytest.mark.parametrize("empty", ["batch", "queries", "value width"])
def test_empty_dimensions_give_empty_results(backend, kernel, empty):
    sizes = {"batch": 0, "num_queries": 0, "value_width": 0}
    key_name = {"batch": "batch", "queries": "num_queries", "value width": "value_width"}[empty]
    query, key, value = operands(width=affinities.get(kernel).width_qk or 4, num_keys=6, **{key_name: sizes[key_name]})
    for tensor in (query, key, value):
        tensor.requires_grad_()
    out = fastnl.nonlocal_aggregate(query, key, value, kernel=kernel, backend=backend)
    assert out.shape == (query.shape[0], query.shape[1], value.shape[2])
    out.sum().backward()
    assert query.grad.shape == query.shape and key.grad.shape == key.shape
