"""The application's own packages: a clear message naming the missing one.

The library (ops, backends, modules, models) needs only torch. Training, data loading
and the spectrum tool need the packages of the `train` extra; their modules call
`require` before importing them, so a library-only install fails with the fix, not
with a bare ModuleNotFoundError deep in an import chain.
"""
import importlib.util

# import name -> the name pip installs it by
_DISTRIBUTIONS = {"numpy": "numpy", "PIL": "pillow", "tqdm": "tqdm", "matplotlib": "matplotlib",
                  "torchvision": "torchvision"}


def require(purpose, *modules, extra="train"):
    """Raise ModuleNotFoundError naming what `purpose` needs and is not installed."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        packages = " ".join(_DISTRIBUTIONS.get(name, name) for name in missing)
        raise ModuleNotFoundError(
            f"{purpose} needs {packages}, which is not installed: pip install 'fastnl[{extra}]' "
            f"(or pip install {packages})", name=missing[0])
