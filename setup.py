"""Packaging.

The library needs only torch (and ninja, which builds the compiled kernels); the CIFAR
application and the tests bring their own packages as extras. Nothing is compiled at
install time: the C++/CUDA sources of csrc/ travel as package data (`fastnl/csrc` in a
wheel; csrc/ itself in an editable checkout) and are built with ninja by
torch.utils.cpp_extension on first use (README, "Pre-building the compiled kernels").
"""
from setuptools import setup

TRAIN = ["numpy", "pillow", "tqdm", "matplotlib", "torchvision>=0.26"]
TEST = ["pytest>=8", "pytest-benchmark>=4", "pytest-timeout"]
LINT = ["ruff", "clang-format"]

setup(
    name="fastnl",
    version="0.1.0",
    description="Fused, memory-light nonlocal operators and modules for PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=["fastnl", "fastnl.backends", "fastnl.kernels", "fastnl.models", "fastnl.spectrum", "fastnl.csrc",
              "fastnl.app", "fastnl.app.spectrum"],
    package_dir={"fastnl.kernels": "kernels", "fastnl.csrc": "csrc"},
    package_data={"fastnl.csrc": ["cpu/*.cpp", "cpu/*.h", "cuda/*.cpp", "cuda/*.cu", "cuda/*.h"]},
    install_requires=["torch>=2.11", "ninja"],
    extras_require={"train": TRAIN, "test": TEST, "dev": TRAIN + TEST + LINT},
)
