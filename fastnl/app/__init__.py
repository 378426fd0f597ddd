"""The CIFAR application built on the library: training, reproduction of the paper's
Table 1, distributed runs and the spectrum tool.

It depends on the library only through its public surface (`fastnl`'s names,
`fastnl.models`, the backend resolver `fastnl.backends.resolve`, and
`fastnl.reference.normalized_affinity` for the spectrum tool), which
tests/test_layout.py checks. The commands keep their short names:
`python -m fastnl.train`, `python -m fastnl.reproduce`, `python -m fastnl.spectrum`.
"""
