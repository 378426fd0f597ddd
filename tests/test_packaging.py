"""Packaging: the compiled backends find their sources in any install form, extension
builds are named per torch version, and a missing application package is named.

The install forms themselves (a wheel in a fresh environment outside the checkout, on
an older torch) are exercised by .ci/run through .ci/smoke_installed.py.
"""
import importlib.util
import re

import pytest
import torch

from fastnl.app import _extras
from fastnl.backends import _sources


@pytest.mark.parametrize("part, expected", [("cpu", "softmax_forward.cpp"), ("cuda", "softmax_kernels.cu")])
def test_sources_are_found(part, expected):
    assert (_sources.source_dir(part) / expected).is_file()


def test_missing_sources_say_where_they_were_looked_for(monkeypatch, tmp_path):
    monkeypatch.setattr(_sources, "_CANDIDATES", (tmp_path / "a", tmp_path / "b"))
    with pytest.raises(FileNotFoundError, match=r"cpu sources are not installed \(looked in .*a/cpu, .*b/cpu\)"):
        _sources.source_dir("cpu")


def test_package_copy_is_preferred_over_the_checkout(monkeypatch, tmp_path):
    """A wheel's fastnl/csrc wins over a csrc/ that happens to sit beside site-packages."""
    installed, beside = tmp_path / "fastnl" / "csrc", tmp_path / "csrc"
    for root in (installed, beside):
        (root / "cpu").mkdir(parents=True)
    monkeypatch.setattr(_sources, "_CANDIDATES", (installed, beside))
    assert _sources.source_dir("cpu") == installed / "cpu"


def test_extension_names_carry_the_torch_version():
    name = _sources.extension_name("fastnl_cpp_avx512")
    assert name.startswith("fastnl_cpp_avx512_torch")
    assert re.fullmatch(r"\w+", name)
    assert re.sub(r"\W+", "_", torch.__version__) in name


def test_missing_application_package_is_named_with_its_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "PIL" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"data loading needs pillow, which is not installed: "
                                                  r"pip install 'fastnl\[train\]'"):
        _extras.require("data loading", "numpy", "PIL")
    _extras.require("data loading", "numpy")  # present: no error
