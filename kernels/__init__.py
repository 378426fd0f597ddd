"""Triton kernels for fastnl (imported as fastnl.kernels)."""
