"""Packaging. Nothing is compiled at install time: the C++/CUDA sources in csrc/ are
built with ninja by torch.utils.cpp_extension on first use (see README, "Pre-building")."""
from setuptools import setup

setup(
    name="fastnl",
    version="0.1.0",
    description="Fused, memory-light nonlocal operators and modules for PyTorch",
    python_requires=">=3.10",
    packages=["fastnl", "fastnl.backends", "fastnl.kernels", "fastnl.models", "fastnl.spectrum"],
    package_dir={"fastnl.kernels": "kernels"},
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "triton",
        "ninja",
        "numpy",
        "tqdm",
        "matplotlib",
        "pillow",
        "pytest",
        "pytest-benchmark",
    ],
)
