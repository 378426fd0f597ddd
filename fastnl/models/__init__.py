"""Models: CIFAR (Pre)ResNets with nonlocal blocks or stages at chosen places.

`build_model` is the one constructor the training, checkpoint and analysis code use;
the placement format and the Table 1 presets are documented in
`fastnl.models.placement`.
"""
import torch

from fastnl.insert import insert_nonlocal
from fastnl.models import placement as placements
from fastnl.models.placement import PRESETS
from fastnl.models.resnet import WIDTHS, CifarResNet

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

    The modules go in with `fastnl.insert_nonlocal`, each after its residual block
    (`layers.{i}.nonlocal_module`); every one uses kernel `mode` and op `backend` (None:
    the device's default); all are the identity when new, so each model starts as its
    baseline.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)}")
    depth, preact = ARCHS[arch]
    model = CifarResNet(depth, num_classes=num_classes, preact=preact)
    blocks_per_stage = len(model.layers) // len(WIDTHS)
    places = {}  # one insert_nonlocal call (one probing forward) per kind of module
    for item in placements.parse(placement):
        if not (1 <= item.stage <= len(WIDTHS) and 1 <= item.block <= blocks_per_stage):
            raise ValueError(f"no slot {item.stage}.{item.block} (stage {item.stage}, block {item.block}) in "
                             f"{placement!r}: a {depth}-layer network has stages 1-{len(WIDTHS)} of blocks "
                             f"1-{blocks_per_stage}")
        count = ("num_blocks" if item.kind == "proposed" else "stacked", item.count)
        places.setdefault(count, []).append(f"layers.{(item.stage - 1) * blocks_per_stage + item.block - 1}")
    for (name, count), names in places.items():
        insert_nonlocal(model, names, torch.zeros(1, 3, 32, 32), mode=mode, backend=backend, **{name: count})
    return model


__all__ = ["ARCHS", "PRESETS", "build_model"]
