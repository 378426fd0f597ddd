"""Where the C++/CUDA sources are, in every install form, and what their builds are called.

A wheel or `pip install .` carries csrc/ as package data inside the package
(`fastnl/csrc`, see setup.py); an editable install or a plain checkout leaves it beside
the package (`<repo>/csrc`). The compiled backends build from whichever holds them.
"""
import re
from pathlib import Path

import torch

_PACKAGE = Path(__file__).resolve().parents[1]
_CANDIDATES = (_PACKAGE / "csrc", _PACKAGE.parent / "csrc")


def source_dir(part):
    """The folder of `part` ("cpu" or "cuda") of csrc/; raises if no install form holds it."""
    for root in _CANDIDATES:
        if (root / part).is_dir():
            return root / part
    looked = ", ".join(str(root / part) for root in _CANDIDATES)
    raise FileNotFoundError(f"fastnl's {part} sources are not installed (looked in {looked}); "
                            f"reinstall fastnl from a wheel, an sdist or a checkout that holds csrc/")


def extension_name(base):
    """`base` plus the running torch's version: torch's extension cache keys builds by
    name, and a library built against one torch must not be loaded by another (two
    environments sharing ~/.cache/torch_extensions would otherwise rebuild in turn)."""
    return f"{base}_torch{re.sub(r'[^0-9A-Za-z]+', '_', torch.__version__)}"
