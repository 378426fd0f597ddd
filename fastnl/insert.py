"""insert_nonlocal: nonlocal blocks or stages in an existing network, after named submodules.

Wang et al. put nonlocal blocks after residual blocks of an ImageNet or video ResNet
(5 blocks: every other residual block of res3 and res4; 10 blocks: every one); this
does that for any `nn.Module` whose submodules have names, without touching the
network's own code or its state_dict keys.
"""
import torch
from torch import nn

from fastnl._probe import captured_forward
from fastnl.modules import NonlocalBlock, NonlocalStage

NAME = "nonlocal_module"  # the inserted module's name under its place
_INFERRED = ("in_channels", "dimension")


def _run_inserted(module, args, output):
    """Forward hook of a place that is not a Sequential: its output through the new module."""
    return getattr(module, NAME)(output)


def _output_shapes(model, places, example_input):
    """{place: output shape, or the output's type name if not a tensor} from one forward."""
    outputs = captured_forward(model, example_input, places)
    return {place: out.shape if isinstance(out, torch.Tensor) else type(out).__name__ for place, out in outputs.items()}


def _new_module(num_blocks, stacked, options):
    if num_blocks is not None:
        return NonlocalStage(num_blocks=num_blocks, **options)
    if stacked is not None:
        return nn.Sequential(*(NonlocalBlock(**options) for _ in range(stacked)))
    return NonlocalBlock(**options)


def insert_nonlocal(model, places, example_input, *, num_blocks=None, stacked=None, **options):
    """Apply a new nonlocal module to the output of each submodule named in `places`.

    places: dotted names as in `model.named_modules()` (e.g. "layer2.1" for the second
    bottleneck of a torchvision ResNet's layer2); each gets its own module, right after
    it, on its output (B, C, *S). C and the dimension (1-3 spatial axes) are read from
    one forward of `example_input` (in eval mode, without gradients). By default each
    place gets one `NonlocalBlock` (Wang et al.); `num_blocks=K` a `NonlocalStage` of K
    blocks (Tao et al.); `stacked=K` K `NonlocalBlock`s in a row, an `nn.Sequential`
    (Tao et al.'s "original-K" rows); `options` are the modules' other arguments (mode,
    inter_channels, sub_sample, bn_layer, use_scale, scale, backend). New modules are the
    identity, so the network computes exactly what it did. The module is registered as `{place}.nonlocal_module`
    (state_dict keys `{place}.nonlocal_module.*`, the network's own keys unchanged); a
    Sequential place runs it as its last child, any other place through a forward hook.
    Returns `model`, changed in place.
    """
    places = list(places)
    if num_blocks is not None and stacked is not None:
        raise TypeError("pass num_blocks (a NonlocalStage) or stacked (NonlocalBlocks in a row), not both")
    if stacked is not None and stacked < 1:
        raise ValueError(f"stacked must be at least 1, got {stacked}")
    given = [name for name in _INFERRED if name in options]
    if given:
        raise TypeError(f"insert_nonlocal infers {', '.join(given)} from each place's output; do not pass them")
    if len(set(places)) != len(places):
        raise ValueError(f"places name a submodule twice: {places}")
    modules = dict(model.named_modules())
    found = {}
    for place in places:
        if not place or place not in modules:
            nearby = [name for name in modules if name and name.count(".") <= 1][:12]
            raise ValueError(f"no submodule {place!r} in {type(model).__name__}; places are named as in "
                             f"model.named_modules(), e.g. {', '.join(nearby)}")
        module = modules[place]
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            raise ValueError(f"{place!r} is a {type(module).__name__}, which has no output; name one of its items")
        if hasattr(module, NAME):
            raise ValueError(f"{place!r} already has a nonlocal module ({place}.{NAME})")
        found[place] = module
    shapes = _output_shapes(model, found, example_input)
    for place, module in found.items():
        shape = shapes.get(place)
        if shape is None:
            raise ValueError(f"{place!r} did not run in the forward of example_input, so its output is unknown")
        if not isinstance(shape, torch.Size) or not 3 <= len(shape) <= 5:
            raise ValueError(f"{place!r} outputs {shape if isinstance(shape, str) else tuple(shape)}; a nonlocal "
                             f"module needs a (B, C, *S) tensor with 1 to 3 spatial axes")
        kwargs = dict(options, in_channels=shape[1], dimension=len(shape) - 2)
        try:
            inserted = _new_module(num_blocks, stacked, kwargs)
        except (TypeError, ValueError) as error:
            raise type(error)(f"at {place!r} (output {tuple(shape)}): {error}") from error
        module.add_module(NAME, inserted.to(next(module.parameters(), example_input)))
        if not isinstance(module, nn.Sequential):
            module.register_forward_hook(_run_inserted)
    return model
