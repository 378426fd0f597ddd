"""The affinity registry: a kernel added by one entry runs everywhere the built-in ones
do. The toy "cosine" kernel, a softmax over normalised queries and keys, is this file's
fixture: registering it is the whole change (no backend, op, check or module edited)."""
import pytest
import torch
import torch.nn.functional as F
from harness import cpu_backends

import fastnl
from fastnl import affinities, backends


@pytest.fixture
def cosine():
    entry = affinities.register(affinities.Affinity(
        "cosine", "softmax", scores=lambda q, k, scale: scale * (q @ k.transpose(1, 2)),
        formula="w = exp(scale q_i.k_j / (|q_i| |k_j|)), C_i = sum_j w",
        prepare=lambda q, k: (F.normalize(q, dim=-1), F.normalize(k, dim=-1))))
    yield entry
    affinities.unregister("cosine")


def _truth(query, key, value, scale):
    """Written out here, independent of the registry's own formula."""
    q, k = (t / t.norm(dim=-1, keepdim=True) for t in (query, key))
    return torch.softmax(scale * q @ k.transpose(1, 2), dim=-1) @ value - value


@pytest.mark.parametrize("backend", ["reference", *cpu_backends()])
def test_a_registered_kernel_runs_forward_and_backward(cosine, backend):
    query, key, value = (torch.randn(2, 37, width, dtype=torch.float64, requires_grad=True) for width in (8, 8, 5))
    out = fastnl.nonlocal_diffuse(query, key, value, value, kernel="cosine", scale=4.0, backend=backend)
    expected = _truth(query, key, value, 4.0)
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.square().sum(), (query, key, value))
    expected_grads = torch.autograd.grad(expected.square().sum(), (query, key, value))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)


def test_a_registered_kernel_shares_stage_statistics(cosine):
    query, key, value = (torch.randn(2, 20, width, dtype=torch.float64) for width in (8, 8, 5))
    _, log_normalizer = fastnl.nonlocal_attend(query, key, value, kernel="cosine")
    q, k = (t / t.norm(dim=-1, keepdim=True) for t in (query, key))
    torch.testing.assert_close(log_normalizer, torch.logsumexp(q @ k.transpose(1, 2), dim=-1))
    again, _ = fastnl.nonlocal_attend(query, key, value, value, kernel="cosine", log_normalizer=log_normalizer)
    torch.testing.assert_close(again, _truth(query, key, value, 1.0))


def test_kernel_names_are_checked(cosine):
    assert "cosine" in affinities.names()
    with pytest.raises(ValueError, match="already registered"):
        affinities.register(cosine)
    with pytest.raises(ValueError, match=r"kernel must be one of \('softmax', 'dot', 'concat', 'cosine'\)"):
        fastnl.nonlocal_aggregate(*(torch.randn(1, 4, 2) for _ in range(3)), kernel="sine")


def test_a_mean_kernel_runs_only_where_it_is_implemented(monkeypatch):
    """A mean-normalised kernel brings its own backend functions: backend=None passes over
    the backends without them, with a warning, and naming one of those raises."""
    from fastnl.backends import torch_tiled

    monkeypatch.setattr(torch_tiled, "halfdot_forward",
                        lambda q, k, v, c, scale: torch_tiled.dot_forward(q, k, v, c, scale / 2), raising=False)
    monkeypatch.setattr(torch_tiled, "halfdot_backward",
                        lambda g, q, k, v, c, scale: torch_tiled.dot_backward(g, q, k, v, c, scale / 2), raising=False)
    affinities.register(affinities.Affinity("halfdot", "mean", lambda q, k, s: s / 2 * (q @ k.transpose(1, 2)),
                                            "w = scale q_i.k_j / 2, C_i = M"))
    backends._warn_passed_over.cache_clear()
    try:
        query, key, value = (torch.randn(2, 9, width) for width in (4, 4, 3))
        expected = fastnl.nonlocal_aggregate(query, key, value, kernel="halfdot", backend="reference")
        if backends.resolve(None, "cpu") == "cpp":
            with pytest.warns(RuntimeWarning, match="backend 'cpp' passed over .*does not implement kernel"):
                out = fastnl.nonlocal_aggregate(query, key, value, kernel="halfdot")
            with pytest.raises(ValueError, match="does not implement kernel 'halfdot'"):
                fastnl.nonlocal_aggregate(query, key, value, kernel="halfdot", backend="cpp")
        else:
            out = fastnl.nonlocal_aggregate(query, key, value, kernel="halfdot")
        torch.testing.assert_close(out, expected)
    finally:
        affinities.unregister("halfdot")
