"""Spectrum and stability analysis of nonlocal networks (`python -m fastnl.spectrum`).

- `weight_spectra(model, top)`: eigenvalues of the symmetrised W_z W_g of every block,
  the quantity Tao et al. plot for trained networks.
- `affinity_spectra(model, images)`: the affinity P of every module on real inputs,
  its row-stochasticity, and how far the eigenvalues of P - I lie outside the
  stability disc |lambda + 1| <= 1.
- `analyze(model, top, images)`: both, as the JSON-ready report the CLI writes.

Everything takes a plain nn.Module containing fastnl's NonlocalBlock / NonlocalStage.
"""
from fastnl.app.spectrum.affinity import affinity_spectra
from fastnl.app.spectrum.discover import nonlocal_modules
from fastnl.app.spectrum.report import analyze
from fastnl.app.spectrum.weights import weight_spectra

__all__ = ["affinity_spectra", "analyze", "nonlocal_modules", "weight_spectra"]
