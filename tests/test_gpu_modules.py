"""The nonlocal modules on a GPU: eager, torch.compile and bf16 autocast, forward and
backward, against the same module on the reference backend (skipped without CUDA).

The modules' own logic is tested on the CPU (test_modules.py); here the question is
whether the CUDA path of a whole module (Triton kernels inside convolutions and
BatchNorm, compiled graphs, autocast's dtypes) computes what the reference does.
"""
import copy

import pytest
import torch
from test_modules import randomize

import fastnl

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

MODULES = {
    "block-embedded_gaussian": lambda: fastnl.NonlocalBlock(32),
    "block-dot_product-sub_sample": lambda: fastnl.NonlocalBlock(32, mode="dot_product", sub_sample=True),
    "stage-3": lambda: fastnl.NonlocalStage(32, num_blocks=3),
    "video-block": lambda: fastnl.NonlocalBlock(32, dimension=3, sub_sample=True),
}


def _input(name):
    shape = (2, 32, 4, 10, 10) if name.startswith("video") else (4, 32, 16, 16)
    return torch.randn(shape, device="cuda")


def _run(module, x):
    x = x.detach().requires_grad_()
    out = module(x)
    out.square().mean().backward()
    return out.detach(), x.grad, [p.grad for p in module.parameters()]


def _pair(name):
    module = randomize(MODULES[name]()).cuda().eval()
    reference = copy.deepcopy(module)
    reference.backend = "reference"
    return module, reference


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compile"])
@pytest.mark.parametrize("name", MODULES)
def test_module_matches_reference(name, compiled):
    module, reference = _pair(name)
    x = _input(name)
    run = torch.compile(module, fullgraph=True) if compiled else module
    out, grad_x, grads = _run(run, x)
    expected_out, expected_x, expected = _run(reference, x)
    torch.testing.assert_close(out, expected_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grad_x, expected_x, atol=1e-4, rtol=1e-4)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("name", MODULES)
def test_module_under_bf16_autocast(name):
    """Autocast runs the convolutions and the nonlocal ops in bf16; the result stays
    within bf16's rounding of the float32 module's (2^-8 relative, with room for the
    few roundings in a row)."""
    module, _ = _pair(name)
    x = _input(name)
    expected, _, _ = _run(module, x)
    module.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, grad_x, _ = _run(module, x)
    assert torch.isfinite(out).all() and torch.isfinite(grad_x).all()
    scale = expected.abs().max().item()
    assert (out.float() - expected).abs().max().item() <= 0.05 * scale
