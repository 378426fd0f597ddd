"""fastnl: fused, memory-light nonlocal operators and modules for PyTorch."""
from fastnl.functional import nonlocal_aggregate, nonlocal_attend, nonlocal_diffuse
from fastnl.modules import NonlocalBlock, NonlocalStage

__all__ = [
    "NonlocalBlock",
    "NonlocalStage",
    "nonlocal_aggregate",
    "nonlocal_attend",
    "nonlocal_diffuse",
]
__version__ = "0.1.0"
