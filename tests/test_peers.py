"""NonlocalBlock.from_state_dict against each peer's block, written here in plain torch
from the peers' formulas with their state_dict keys: outputs and input gradients, in
training (batch statistics) and evaluation (running statistics) modes."""
import pytest
import torch
import torch.nn.functional as F

import fastnl

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
POOL = {1: lambda t: F.max_pool1d(t, 2), 2: lambda t: F.max_pool2d(t, 2), 3: lambda t: F.max_pool3d(t, (1, 2, 2))}
SPATIAL = {1: (8,), 2: (6, 4), 3: (2, 4, 4)}
# the peers' part names: layout -> role -> key prefix (with and without sub_sample's Sequential)
NAMES = {
    "alexhex7": lambda sub: {"g": "g.0" if sub else "g", "theta": "theta", "phi": "phi.0" if sub else "phi",
                             "concat": "concat_project.0", "out": "W.0", "out_alone": "W", "bn": "W.1"},
    "mmcv": lambda sub: {"g": "g.0.conv" if sub else "g.conv", "theta": "theta.conv",
                         "phi": "phi.0.conv" if sub else "phi.conv", "concat": "concat_project.conv",
                         "out": "conv_out.conv", "out_alone": "conv_out.conv", "bn": "conv_out.bn"},
    "timm": lambda sub: {"g": "g", "theta": "t", "phi": "p", "out": "z", "bn": "norm"},
}


def peer_state(layout, kind, channels, inter, dimension, sub_sample, bn):
    """Random weights under the peer's keys, shaped as the peer builds them."""
    names, ones, state = NAMES[layout](sub_sample), (1,) * dimension, {}

    def conv(name, cin, cout, bias=True):
        state[f"{name}.weight"] = 0.4 * torch.randn(cout, cin, *ones, dtype=torch.float64)
        if bias:
            state[f"{name}.bias"] = 0.1 * torch.randn(cout, dtype=torch.float64)

    conv(names["g"], channels, inter)
    if kind != "gaussian":
        conv(names["theta"], channels, inter)
        conv(names["phi"], channels, inter)
    if kind == "concatenation":  # AlexHex7's projection is a Conv2d in every dimension
        shape = (1, 2 * inter, 1, 1) if layout == "alexhex7" else (1, 2 * inter, *ones)
        state[f"{names['concat']}.weight"] = torch.randn(shape, dtype=torch.float64)
    if bn:
        conv(names["out"], inter, channels, bias=layout != "mmcv")  # mmcv's ConvModule drops it before a norm
        bn_name = names["bn"]
        state.update({f"{bn_name}.weight": torch.rand(channels, dtype=torch.float64) + 0.5,
                      f"{bn_name}.bias": 0.1 * torch.randn(channels, dtype=torch.float64),
                      f"{bn_name}.running_mean": 0.1 * torch.randn(channels, dtype=torch.float64),
                      f"{bn_name}.running_var": torch.rand(channels, dtype=torch.float64) + 0.5,
                      f"{bn_name}.num_batches_tracked": torch.tensor(3)})
    else:
        conv(names["out_alone"], inter, channels)
    return state


def peer_forward(x, state, layout, kind, scale, sub_sample, bn, training):
    """The peers' block: embeddings, N x M pairwise weights, their normalisation, W_z (BN), residual."""
    names, dimension = NAMES[layout](sub_sample), x.dim() - 2
    conv, pool = CONV[dimension], POOL[dimension]

    def embed(name, inputs):
        return conv(inputs, state[f"{name}.weight"], state.get(f"{name}.bias"))

    g = embed(names["g"], x)
    if kind == "gaussian":
        theta, phi = x, x
    else:
        theta, phi = embed(names["theta"], x), embed(names["phi"], x)
    if sub_sample:
        g, phi = pool(g), pool(phi)
    theta_x = theta.flatten(2).transpose(1, 2)  # (B, N, C')
    phi_x = phi.flatten(2)  # (B, C', M)
    g_x = g.flatten(2).transpose(1, 2)  # (B, M, C')
    if kind == "concatenation":  # channel-concatenate theta_i and phi_j, 1x1-project, ReLU, / M
        weight = state[f"{names['concat']}.weight"].flatten()
        pairs = torch.cat([theta_x.unsqueeze(2).expand(-1, -1, phi_x.shape[2], -1),
                           phi_x.transpose(1, 2).unsqueeze(1).expand(-1, theta_x.shape[1], -1, -1)], dim=-1)
        weights = F.relu(pairs @ weight) / phi_x.shape[2]
    elif kind == "dot_product":
        weights = theta_x @ phi_x / phi_x.shape[2]
    else:
        weights = torch.softmax(scale * (theta_x @ phi_x), dim=-1)
    y = (weights @ g_x).transpose(1, 2).reshape(x.shape[0], -1, *x.shape[2:])
    if not bn:
        return x + embed(names["out_alone"], y)
    bn_name = names["bn"]
    out = F.batch_norm(embed(names["out"], y), state[f"{bn_name}.running_mean"].clone(),
                       state[f"{bn_name}.running_var"].clone(), state[f"{bn_name}.weight"],
                       state[f"{bn_name}.bias"], training=training)
    return x + out


CASES = [
    # layout, kind, dimension, sub_sample, bn, the peer's logit scale given (C, C')
    *[("alexhex7", kind, 2, sub, bn, lambda c, d: 1.0)
      for kind in ("embedded_gaussian", "gaussian", "dot_product", "concatenation")
      for sub in (False, True) for bn in (True, False)],
    ("alexhex7", "embedded_gaussian", 1, True, True, lambda c, d: 1.0),
    ("alexhex7", "concatenation", 3, True, True, lambda c, d: 1.0),
    *[("mmcv", kind, 2, sub, bn, (lambda c, d: d ** -0.5) if kind == "embedded_gaussian" else (lambda c, d: 1.0))
      for kind in ("embedded_gaussian", "gaussian", "dot_product", "concatenation")
      for sub in (False, True) for bn in (True, False)],
    ("mmcv", "embedded_gaussian", 3, True, False, lambda c, d: d ** -0.5),
    ("timm", "embedded_gaussian", 2, False, True, lambda c, d: c ** -0.5),
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout, kind, dimension, sub_sample, bn, scale", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}d-sub{int(c[3])}-bn{int(c[4])}" for c in CASES])
def test_loads_and_computes_the_peers_block(layout, kind, dimension, sub_sample, bn, scale, training):
    channels, inter = 8, 4
    state = peer_state(layout, kind, channels, inter, dimension, sub_sample, bn)
    mode = kind if kind in ("dot_product", "embedded_gaussian") else None  # the keys tell the others
    block = fastnl.NonlocalBlock.from_state_dict(state, layout, mode=mode).double().train(training)
    assert block.mode == kind and block.sub_sample == sub_sample and block.dimension == dimension
    x = torch.randn(2, channels, *SPATIAL[dimension], dtype=torch.float64, requires_grad=True)
    expected = peer_forward(x, state, layout, kind, scale(channels, inter), sub_sample, bn, training)
    actual = block(x)
    torch.testing.assert_close(actual, expected)
    grad = torch.randn_like(expected)
    torch.testing.assert_close(torch.autograd.grad(actual, x, grad)[0], torch.autograd.grad(expected, x, grad)[0])


def test_timm_without_scale_and_mmcv_without_use_scale():
    for layout, options in (("timm", {"use_scale": False}), ("mmcv", {"use_scale": False})):
        state = peer_state(layout, "embedded_gaussian", 8, 4, 2, False, True)
        block = fastnl.NonlocalBlock.from_state_dict(state, layout, **options).double().eval()
        x = torch.randn(2, 8, 6, 4, dtype=torch.float64)
        expected = peer_forward(x, state, layout, "embedded_gaussian", 1.0, False, True, False)
        torch.testing.assert_close(block(x), expected)


def test_foreign_keys_are_a_clear_error():
    state = peer_state("alexhex7", "embedded_gaussian", 8, 4, 2, False, True)
    with pytest.raises(KeyError, match="not a mmcv nonlocal block's state_dict: no 'g.conv.weight'"):
        fastnl.NonlocalBlock.from_state_dict(state, "mmcv")
    with pytest.raises(KeyError, match=r"keys of no alexhex7 nonlocal block part: \['extra.weight'\]"):
        fastnl.NonlocalBlock.from_state_dict({**state, "extra.weight": torch.zeros(1)}, "alexhex7")
    with pytest.raises(KeyError, match="not a timm nonlocal block's state_dict: no 't.weight'"):
        fastnl.NonlocalBlock.from_state_dict(state, "timm")
    with pytest.raises(ValueError, match="layout must be one of"):
        fastnl.NonlocalBlock.from_state_dict(state, "keras")


def test_a_mode_the_keys_contradict_is_an_error():
    state = peer_state("alexhex7", "embedded_gaussian", 8, 4, 2, False, True)
    with pytest.raises(ValueError, match="mode='gaussian' does not match these alexhex7 weights"):
        fastnl.NonlocalBlock.from_state_dict(state, "alexhex7", mode="gaussian")
    concat = peer_state("mmcv", "concatenation", 8, 4, 2, False, True)
    with pytest.raises(ValueError, match="a concatenation block"):
        fastnl.NonlocalBlock.from_state_dict(concat, "mmcv", mode="dot_product")


def test_an_explicit_scale_and_use_scale_exclude_each_other():
    assert fastnl.NonlocalBlock(8, scale=0.25).affinity.scale == 0.25
    with pytest.raises(ValueError, match="not both"):
        fastnl.NonlocalBlock(8, use_scale=True, scale=0.25)
