"""CIFAR (Pre)ResNets (He et al. 2016a, 2016b) with slots for nonlocal modules.

Standard CIFAR layout: a 3x3 convolution to 16 channels, then three residual stages of
`n` basic blocks (16, 32, 64 channels; the first block of stages 2 and 3 halves the map
with stride 2), global average pooling and a linear classifier; depth = 6n + 2.
Where the width or stride changes, the shortcut is a 1x1 convolution (He et al.'s
option B): with BatchNorm in the post-activation ResNet, without it in the
pre-activation one, where it reads the block's pre-activated input (as in the authors'
fb.resnet.torch preresnet.lua). For 10 classes this gives 272,474 parameters for
resnet20 and 272,282 for preresnet20 (tests/test_models.py checks both).

`layers` holds the residual blocks only; fastnl.models.build_model adds nonlocal
modules under them (`layers.{i}.nonlocal_module`, run on block i's output). Checkpoints
written before that kept the modules as items of `layers`, between the blocks
(`layers.{i}` counting both); they load unchanged: `load_state_dict` renames their keys
(`_nested_nonlocal_keys`). Parameters come in the same order either way, so the
optimizer states saved with them load too.
"""
import re

from torch import nn

from fastnl.insert import NAME

WIDTHS = (16, 32, 64)


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus identity (or 1x1 projection) shortcut."""

    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x):
        activated = self.relu(self.bn1(x))
        residual = self.shortcut(activated) if self.shortcut is not None else x
        out = self.conv1(activated)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + residual


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU (post-activation)."""

    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """(B, 3, 32, 32) -> logits (B, num_classes); `preact` picks PreResNet or ResNet."""

    def __init__(self, depth, num_classes=10, preact=True):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1, got {depth}")
        blocks_per_stage = (depth - 2) // 6
        block = PreActBlock if preact else BasicBlock
        self.stem = nn.Conv2d(3, WIDTHS[0], 3, 1, 1, bias=False)
        self.stem_bn = None if preact else nn.BatchNorm2d(WIDTHS[0])
        layers, in_channels = [], WIDTHS[0]
        for stage, width in enumerate(WIDTHS, start=1):
            for index in range(1, blocks_per_stage + 1):
                stride = 2 if stage > 1 and index == 1 else 1
                layers.append(block(in_channels, width, stride))
                in_channels = width
        self.layers = nn.Sequential(*layers)
        self.head_bn = nn.BatchNorm2d(in_channels) if preact else None
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        self._init_weights()
        self.register_load_state_dict_pre_hook(_nested_nonlocal_keys)

    def _init_weights(self):
        # He et al.'s initialisation for the residual convolutions only: nonlocal
        # modules keep their own (zero-scale BatchNorm makes a new block the identity)
        for module in self.modules():
            if isinstance(module, (PreActBlock, BasicBlock)):
                for conv in module.modules():
                    if isinstance(conv, nn.Conv2d):
                        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.kaiming_normal_(self.stem.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.stem(x)
        if self.stem_bn is not None:
            x = self.relu(self.stem_bn(x))
        x = self.layers(x)
        if self.head_bn is not None:
            x = self.relu(self.head_bn(x))
        return self.fc(self.pool(x).flatten(1))


def _nested_nonlocal_keys(model, state_dict, prefix, *args):
    """Rename, in place, the keys of a checkpoint whose nonlocal modules were items of
    `layers` between the residual blocks: item c becomes `layers.{i}` or
    `layers.{i}.nonlocal_module`. Such a checkpoint numbers items past the last block;
    any other is left as it is."""
    pattern = re.compile(re.escape(prefix) + r"layers\.(\d+)\.(.*)")
    matches = {key: pattern.fullmatch(key) for key in state_dict}
    if max((int(m[1]) for m in matches.values() if m), default=-1) < len(model.layers):
        return
    names = []
    for index, block in enumerate(model.layers):
        names.append(str(index))
        if hasattr(block, NAME):
            names.append(f"{index}.{NAME}")
    renamed = {}
    for key, value in state_dict.items():
        match = matches[key]
        if match and int(match[1]) < len(names):
            key = f"{prefix}layers.{names[int(match[1])]}.{match[2]}"
        renamed[key] = value
    state_dict.clear()
    state_dict.update(renamed)
