"""Smoke test of an installed fastnl (a wheel in a fresh venv), run from outside the checkout.

    python .ci/smoke_installed.py CHECKOUT

Fails unless fastnl is imported from site-packages (not from CHECKOUT), the cpp backend
is the CPU default and builds from the installed sources, a diffuse forward+backward
matches the reference, a NonlocalStage runs, every file of csrc/ was installed, and
`python -m fastnl.train --help` works.
"""
import subprocess
import sys
from pathlib import Path

import torch

import fastnl
from fastnl import backends
from fastnl.backends._sources import source_dir

checkout = Path(sys.argv[1]).resolve()
installed = Path(fastnl.__file__).resolve()
assert checkout not in installed.parents, f"fastnl imported from the checkout: {installed}"
print(f"fastnl {fastnl.__version__} from {installed.parent}, torch {torch.__version__}")

for part in ("cpu", "cuda"):  # every source of the checkout travelled with the package
    installed_files = sorted(path.name for path in source_dir(part).iterdir())
    checkout_files = sorted(path.name for path in (checkout / "csrc" / part).iterdir())
    assert checkout not in source_dir(part).parents, f"{part} sources read from the checkout"
    assert installed_files == checkout_files, f"csrc/{part}: installed {installed_files}, checkout {checkout_files}"

resolved = backends.resolve(None, "cpu")
assert resolved == "cpp", f"backend=None on CPU is {resolved!r}: {backends.unavailable_reason('cpp', 'cpu')}"

torch.manual_seed(0)
q, k = torch.randn(2, 37, 8, dtype=torch.float64), torch.randn(2, 37, 8, dtype=torch.float64)
v = torch.randn(2, 37, 16, dtype=torch.float64)
results = {}
for backend in ("cpp", "reference"):
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = fastnl.nonlocal_diffuse(*inputs, inputs[2], backend=backend)
    out.square().sum().backward()
    results[backend] = [out, *(t.grad for t in inputs)]
for name, got, want in zip(("out", "dq", "dk", "dv"), results["cpp"], results["reference"]):
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")

stage = fastnl.NonlocalStage(16, num_blocks=2)
assert stage(torch.randn(2, 16, 6, 5)).shape == (2, 16, 6, 5)

subprocess.run([sys.executable, "-m", "fastnl.train", "--help"], check=True, stdout=subprocess.DEVNULL)
print("installed smoke test: passed (cpp default, diffuse fwd+bwd = reference, NonlocalStage, train --help)")
