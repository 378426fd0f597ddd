"""Nonlocal blocks from the peers' weights: AlexHex7/Non-local_pytorch, mmcv and timm.

Each peer's block, given its state_dict, becomes a `fastnl.NonlocalBlock` that computes
the same function (`NonlocalBlock.from_state_dict(state, layout)`):

- "alexhex7", `NONLocalBlock{1,2,3}D`: 1x1 convolutions `g`, `theta`, `phi` (each
  `Sequential(conv, max-pool)` under sub_sample, so `g.0.weight`), `W.0` conv and `W.1`
  BatchNorm (`W` alone without BN), `concat_project.0` for concatenation; no logit
  scale; dot product and concatenation divide by the number of keys.
- "mmcv", `NonLocal{1,2,3}d`: `g.conv`, `theta.conv`, `phi.conv` (`g.0.conv`,
  `phi.0.conv` under sub_sample; no theta/phi in gaussian mode), `conv_out.conv`, plus
  `conv_out.bn` when built with a norm (then the conv has no bias), `concat_project.conv`;
  `use_scale` (mmcv's default True) divides the embedded_gaussian logits by sqrt(C').
- "timm", `NonLocalAttn` (2D): convolutions `t`, `p`, `g`, `z` and BatchNorm `norm`;
  embedded gaussian with the logits scaled by in_channels ** -0.5 (the input width, not
  the reduced one) when use_scale (timm's default).

Which affinity a dot product or embedded gaussian block used is not in its keys: pass
`mode` (default "embedded_gaussian"); gaussian and concatenation are recognised, and a
`mode` the keys contradict is an error.
"""
import torch

_BATCH_NORM = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _conv(ours, theirs, state, mapping):
    """A 1x1 convolution's weight and bias; a peer's bias-less conv (mmcv before a norm) gets zeros."""
    weight = state[f"{theirs}.weight"]
    mapping[f"{ours}.weight"] = weight
    mapping[f"{ours}.bias"] = state.get(f"{theirs}.bias", weight.new_zeros(weight.shape[0]))


def _batch_norm(ours, theirs, state, mapping):
    for name in _BATCH_NORM:
        if f"{theirs}.{name}" in state:
            mapping[f"{ours}.{name}"] = state[f"{theirs}.{name}"]


# the key prefixes of the two peers that keep Wang et al.'s names; "*_sub" under sub_sample
_WANG_KEYS = {
    "alexhex7": {"g": "g", "g_sub": "g.0", "theta": "theta", "phi": "phi", "phi_sub": "phi.0",
                 "concat": "concat_project.0", "out": "W.0", "out_alone": "W", "bn": "W.1"},
    "mmcv": {"g": "g.conv", "g_sub": "g.0.conv", "theta": "theta.conv", "phi": "phi.conv", "phi_sub": "phi.0.conv",
             "concat": "concat_project.conv", "out": "conv_out.conv", "out_alone": "conv_out.conv",
             "bn": "conv_out.bn"},
}


def _wang_layout(layout, state, mode):
    """(options, part names) of an AlexHex7 or mmcv block, read from its keys."""
    keys = _WANG_KEYS[layout]
    sub_sample = f"{keys['g_sub']}.weight" in state
    if f"{keys['concat']}.weight" in state:
        found = "concatenation"
    elif f"{keys['theta']}.weight" not in state:
        found = "gaussian"
    else:  # embedded_gaussian or dot_product: the same weights
        found = mode if mode in ("embedded_gaussian", "dot_product") else None
    if mode is not None and found != mode:
        raise ValueError(f"mode={mode!r} does not match these {layout} weights "
                         f"({'a ' + found + ' block' if found else 'an embedded_gaussian or dot_product block'})")
    mode = found or "embedded_gaussian"
    bn_layer = f"{keys['bn']}.weight" in state
    names = {"g": keys["g_sub" if sub_sample else "g"], "theta": keys["theta"],
             "phi": keys["phi_sub" if sub_sample else "phi"], "out": keys["out" if bn_layer else "out_alone"],
             "bn": keys["bn"], "concat": keys["concat"]}
    return dict(mode=mode, sub_sample=sub_sample, bn_layer=bn_layer), names


def _alexhex7(state, mode, use_scale):
    options, names = _wang_layout("alexhex7", state, mode)
    return dict(options, use_scale=use_scale or False), names


def _mmcv(state, mode, use_scale):
    options, names = _wang_layout("mmcv", state, mode)
    # mmcv scales the logits in embedded_gaussian mode only (its default use_scale=True)
    use_scale = (True if use_scale is None else use_scale) and options["mode"] == "embedded_gaussian"
    return dict(options, use_scale=use_scale), names


def _timm(state, mode, use_scale):
    if mode not in (None, "embedded_gaussian"):
        raise ValueError(f"timm's NonLocalAttn is an embedded gaussian block, not mode={mode!r}")
    in_channels = state["t.weight"].shape[1]
    scale = in_channels ** -0.5 if use_scale in (None, True) else 1.0
    options = dict(mode="embedded_gaussian", sub_sample=False, bn_layer=True, scale=scale)
    return options, {"g": "g", "theta": "t", "phi": "p", "out": "z", "bn": "norm", "concat": None}


LAYOUTS = {"alexhex7": _alexhex7, "mmcv": _mmcv, "timm": _timm}


def block_from_state_dict(state, layout, *, mode=None, use_scale=None, backend=None):
    """A NonlocalBlock computing what `layout`'s block with `state` computes (see above).

    in_channels, inter_channels and the dimension come from the weights' shapes;
    `use_scale` None keeps the peer's default; `backend` is the block's op backend.
    """
    from fastnl.modules import NonlocalBlock

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
    try:
        options, names = LAYOUTS[layout](state, mode, use_scale)
        state[f"{names['g']}.weight"]
    except KeyError as missing:
        raise KeyError(f"not a {layout} nonlocal block's state_dict: no {missing} "
                       f"(its keys: {', '.join(sorted(state)[:8])}, ...)") from None
    g_weight = state[f"{names['g']}.weight"]
    inter_channels, in_channels = g_weight.shape[:2]
    block = NonlocalBlock(in_channels, inter_channels, dimension=g_weight.dim() - 2, backend=backend, **options)
    block = block.to(dtype=g_weight.dtype, device=g_weight.device)  # the weights' own precision and device
    mapping = {}
    _conv("branches.0.g", names["g"], state, mapping)
    _conv("branches.0.W_z", names["out"], state, mapping)
    if options["bn_layer"]:
        _batch_norm("branches.0.bn", names["bn"], state, mapping)
    if options["mode"] != "gaussian":
        _conv("affinity.theta", names["theta"], state, mapping)
        _conv("affinity.phi.0" if options["sub_sample"] else "affinity.phi", names["phi"], state, mapping)
    if options["mode"] == "concatenation":
        # relu(w . [theta_i, phi_j]) = relu(w_a . theta_i + w_b . phi_j): the weight's halves
        # (AlexHex7's projection is a Conv2d whatever the dimension: reshaped to ours)
        query_half, key_half = state[f"{names['concat']}.weight"].chunk(2, dim=1)
        mapping["affinity.project_query.weight"] = query_half.reshape(block.affinity.project_query.weight.shape)
        mapping["affinity.project_key.weight"] = key_half.reshape(block.affinity.project_key.weight.shape)
    used = {key for key in state if any(key.startswith(f"{name}.") for name in names.values() if name)}
    unknown = sorted(set(state) - used)
    if unknown:
        raise KeyError(f"keys of no {layout} nonlocal block part: {unknown}")
    with torch.no_grad():
        block.load_state_dict(mapping)
    return block
