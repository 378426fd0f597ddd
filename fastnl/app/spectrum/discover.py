"""Find the nonlocal modules of any model and name their blocks by module path.

The analysis needs nothing but an `nn.Module` that contains fastnl's modules, so it
works the same on a PreResNet from `fastnl.models`, a user's own network, or a bare
`NonlocalStage` in a test.
"""
from fastnl import NonlocalBlock, NonlocalStage

NONLOCAL_TYPES = (NonlocalBlock, NonlocalStage)


def nonlocal_modules(model):
    """[(path, module)] for every NonlocalBlock / NonlocalStage in `model`, in module order.

    The path is the module's name in `model.named_modules()`; the model itself, if it is
    one, is named "model" (its empty path would be an unreadable label).
    """
    return [(path or "model", module) for path, module in model.named_modules()
            if isinstance(module, NONLOCAL_TYPES)]


def block_names(path, module):
    """One name per block: the path of the ValueBranch that holds its W_z and W_g.

    A NonlocalBlock has one branch; a NonlocalStage has one per block, so
    "layer2.nonlocal.branches.3" is the stage's fourth block.
    """
    return [f"{path}.branches.{index}" for index in range(len(module.branches))]
