"""The "torch" backend never builds an N x M tensor, forward or backward.

A dispatch mode records the size of every tensor any ATen op produces while the
backend runs; the largest must stay O((N + M) x tile), far below N x M.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastnl import affinities
from fastnl.backends import torch_tiled


class LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for tensor in result if isinstance(result, (tuple, list)) else [result]:
            if isinstance(tensor, torch.Tensor):
                self.numel = max(self.numel, tensor.numel())
        return result


@pytest.mark.parametrize("kernel", affinities.names())
def test_no_quadratic_tensor(kernel):
    num_positions, width, value_width = 2048, affinities.get(kernel).width_qk or 8, 16
    query = torch.randn(1, num_positions, width)
    key = torch.randn(1, num_positions, width)
    value = torch.randn(1, num_positions, value_width)
    center = torch.randn(1, num_positions, value_width)
    functions = affinities.get(kernel).functions
    forward = getattr(torch_tiled, f"{functions}_forward")
    backward = getattr(torch_tiled, f"{functions}_backward")
    with LargestTensor() as tracker:
        if kernel == "softmax":
            out, log_normalizer = forward(query, key, value, center, None, 0.5)
            forward(query, key, value, center, log_normalizer, 0.5)
            backward(torch.randn_like(out), query, key, value, center, out, log_normalizer, 0.5)
        else:
            out, _ = forward(query, key, value, center, 0.5)
            backward(torch.randn_like(out), query, key, value, center, 0.5)
    bound = num_positions * torch_tiled.KEY_TILE if kernel == "softmax" else 4 * num_positions * (value_width + 2)
    assert tracker.numel <= bound < num_positions * num_positions // 4
