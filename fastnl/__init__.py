"""fastnl: fused, memory-light nonlocal operators and modules for PyTorch."""
from fastnl.functional import nonlocal_aggregate, nonlocal_attend, nonlocal_diffuse
from fastnl.insert import insert_nonlocal
from fastnl.modules import NonlocalBlock, NonlocalStage

__all__ = [
    "NonlocalBlock",
    "NonlocalStage",
    "insert_nonlocal",
    "nonlocal_aggregate",
    "nonlocal_attend",
    "nonlocal_diffuse",
]
__version__ = "0.1.0"
