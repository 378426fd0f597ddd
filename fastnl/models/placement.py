"""Where nonlocal modules go in a CIFAR (Pre)ResNet: the spec format and Table 1 presets.

A placement spec is a comma-separated list of items `KIND[:COUNT]@STAGE.BLOCK`:

- KIND `original`: COUNT `fastnl.NonlocalBlock`s stacked, an `nn.Sequential` (Wang et al.);
  KIND `proposed`: one `fastnl.NonlocalStage(num_blocks=COUNT)` (Tao et al.).
  COUNT defaults to 1.
- `@STAGE.BLOCK`: right after residual block BLOCK of residual stage STAGE (both
  1-based; PreResNet-20 has stages 1-3 of blocks 1-3 with 32x32, 16x16 and 8x8 maps).
- `none` (or an empty string): no nonlocal module, the plain network.

Example: `proposed:3@2.2` is a 3-block nonlocal stage after the 2nd residual block of
the 2nd residual stage; `original@1.2,original@2.2,original@3.2` puts one original
block after the 2nd residual block of each stage.

The paper's exact places do not survive (docs/design.md), so the presets are this project's
choice, stated in docs/training.md:

- same place (`original-K`, `proposed-K`): all blocks after residual block 2 of stage 2.
  Its 16x16 maps (N = 256) are the middle of the network, as in Wang et al., who add
  nonlocal blocks to res3/res4 rather than the first, largest maps; the 16 x 256 x 256
  affinity stays small, and every stacked block sees the same N so the K-sweep
  compares depth alone.
- different places (`original-3-diff`, `proposed-3-diff`): one block after residual
  block 2 of each of the three stages (N = 1024, 256, 64), the "different places"
  reading closest to Wang et al.'s multi-stage insertion; a proposed block at its own
  place is a 1-block nonlocal stage (its affinity cannot be shared across places).
"""
import re
from dataclasses import dataclass

KINDS = ("original", "proposed")
SAME_PLACE = "2.2"
DIFFERENT_PLACES = ("1.2", "2.2", "3.2")

PRESETS = {
    "baseline": "none",
    **{f"original-{k}": f"original:{k}@{SAME_PLACE}" for k in (2, 3, 4)},
    **{f"proposed-{k}": f"proposed:{k}@{SAME_PLACE}" for k in (2, 3, 4, 5, 6)},
    **{f"{kind}-3-diff": ",".join(f"{kind}@{place}" for place in DIFFERENT_PLACES) for kind in KINDS},
}

_ITEM = re.compile(r"^(?P<kind>[a-z]+)(?::(?P<count>\d+))?@(?P<stage>\d+)\.(?P<block>\d+)$")


@dataclass(frozen=True)
class Placement:
    """`count` nonlocal blocks of `kind` after residual block `block` of stage `stage`."""

    kind: str
    count: int
    stage: int
    block: int


def resolve(placement):
    """A preset name or a spec -> the spec string (presets expanded)."""
    return PRESETS.get(placement, placement)


def parse(placement):
    """A preset name or spec -> list of Placement, one per slot; ValueError if malformed."""
    spec = resolve(placement).strip()
    if spec in ("", "none"):
        return []
    items, slots = [], set()
    for text in spec.split(","):
        match = _ITEM.match(text.strip())
        if match is None:
            raise ValueError(
                f"bad placement item {text!r} in {placement!r}: expected KIND[:COUNT]@STAGE.BLOCK, "
                f"e.g. 'proposed:3@2.2', or a preset: {', '.join(PRESETS)}")
        kind, count = match["kind"], int(match["count"] or 1)
        stage, block = int(match["stage"]), int(match["block"])
        if kind not in KINDS:
            raise ValueError(f"placement kind must be one of {KINDS}, got {kind!r} in {placement!r}")
        if count < 1 or stage < 1 or block < 1:
            raise ValueError(f"count, stage and block must be at least 1 in {text!r}")
        if (stage, block) in slots:
            raise ValueError(f"slot {stage}.{block} appears twice in {placement!r}")
        slots.add((stage, block))
        items.append(Placement(kind, count, stage, block))
    return items
