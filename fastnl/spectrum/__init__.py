"""`fastnl.spectrum` and `python -m fastnl.spectrum`: the spectrum tool (fastnl/app/spectrum/)."""
from fastnl.app.spectrum import affinity_spectra, analyze, nonlocal_modules, weight_spectra

__all__ = ["affinity_spectra", "analyze", "nonlocal_modules", "weight_spectra"]
