"""Models: CIFAR (Pre)ResNets with nonlocal blocks or stages at chosen places.

`build_model` is the one constructor the training, checkpoint and analysis code use;
the placement format and the Table 1 presets are documented in
`fastnl.models.placement`.
"""
from torch import nn

from fastnl.models import placement as placements
from fastnl.models.placement import PRESETS
from fastnl.models.resnet import WIDTHS, CifarResNet
from fastnl.modules import NonlocalBlock, NonlocalStage

# name -> (depth, pre-activation)
ARCHS = {
    "preresnet20": (20, True),
    "preresnet56": (56, True),
    "preresnet110": (110, True),
    "resnet20": (20, False),
}


def build_model(arch="preresnet20", placement="baseline", num_classes=10, mode="embedded_gaussian",
                backend=None):
    """A CIFAR network `arch` with nonlocal modules at `placement` (preset name or spec).

    Every nonlocal module uses kernel `mode` and op `backend` (None: the device's
    default); all are the identity when new, so each model starts as its baseline.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)}")
    depth, preact = ARCHS[arch]
    inserts = {}
    for item in placements.parse(placement):
        if not 1 <= item.stage <= len(WIDTHS):
            raise ValueError(f"stage {item.stage} out of range 1..{len(WIDTHS)} in {placement!r}")
        channels = WIDTHS[item.stage - 1]
        if item.kind == "proposed":
            module = NonlocalStage(channels, num_blocks=item.count, mode=mode, backend=backend)
        else:
            module = nn.Sequential(*(NonlocalBlock(channels, mode=mode, backend=backend)
                                     for _ in range(item.count)))
        inserts[(item.stage, item.block)] = module
    return CifarResNet(depth, num_classes=num_classes, preact=preact, inserts=inserts)


__all__ = ["ARCHS", "PRESETS", "build_model"]
