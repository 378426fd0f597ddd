"""Drop-in nonlocal modules: Wang et al.'s block and Tao et al.'s stage.

Modules hold convolutions, BatchNorm and reshapes; the arithmetic is
`fastnl.nonlocal_attend`. Choices and where they come from:

- Embeddings theta, phi, g are 1x1 convolutions C -> C' (C' = C // 2 by default, at
  least 1), with bias, as in AlexHex7/Non-local_pytorch.
- `sub_sample` max-pools phi and g *after* their 1x1 convolutions (AlexHex7, mmcv), with
  a 2 window in 1D, 2x2 in 2D and 1x2x2 in 3D (time not pooled, as in AlexHex7); the
  normalisation of dot_product and concatenation divides by the pooled M.
- `gaussian` uses x itself for theta and phi (no embedding, D = C);
  `embedded_gaussian` and `dot_product` use the 1x1 embeddings (D = C');
  `concatenation` projects [theta_i, phi_j] to one number with ReLU (AlexHex7's
  `concat_project`, no bias), computed exactly as relu(w_a.theta_i + w_b.phi_j), D = 1.
- `use_scale` divides the softmax logits by sqrt(D) (mmcv's use_scale); it does not
  apply to dot_product or concatenation, already divided by M. `scale=s` instead sets
  the affinity's factor explicitly (the logits' for softmax: timm's NonLocalAttn uses
  C ** -0.5; the weights' for dot/concat).
- `bn_layer=True`: W_z is a 1x1 convolution C' -> C followed by BatchNorm whose weight
  and bias start at zero; `bn_layer=False`: W_z alone, initialised to zero. Either
  way a new block is the identity (Wang et al., Sec. 4.1).

Layout: the modules work on position rows (B, N, C), the layout of the nonlocal ops.
A channels-last input (`torch.channels_last`, or the 1D/3D equivalent) is such rows
already, viewed without a copy, and the output is a channels-last view of the result
rows; any other input (contiguous, or strided otherwise) is copied into rows once and
the result copied back once into a contiguous tensor. Between the two, every 1x1
convolution is a projection of the rows with the convolution's own weight (so the
parameters keep their names and shapes and old checkpoints load as they are): theta,
phi and the first block's g are one (fastnl.linear_parts on float32 CPU rows, else one
`F.linear`), W_z with its BatchNorm another (fastnl.batch_norm in training on the CPU),
and BatchNorm and max-pooling otherwise run on channels-last views of the rows.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from fastnl import affinities, batch_norm, linear_parts
from fastnl.functional import nonlocal_attend
from fastnl.shared_affinity import SharedAffinity

MODES = {
    "gaussian": "softmax",
    "embedded_gaussian": "softmax",
    "dot_product": "dot",
    "concatenation": "concat",
}
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BATCH_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_POOL = {1: lambda: nn.MaxPool1d(2), 2: lambda: nn.MaxPool2d(2), 3: lambda: nn.MaxPool3d((1, 2, 2))}


def _rows(x):
    """(B, C, *S) -> contiguous rows (B, N, C): a view of a channels-last x, else one copy."""
    return x.movedim(1, -1).reshape(x.shape[0], math.prod(x.shape[2:]), x.shape[1]).contiguous()


def _is_channels_last(x):
    """Whether x (B, C, *S) is channels-last in memory, i.e. already rows."""
    return x.movedim(1, -1).is_contiguous()


def _spatial(rows, spatial):
    """rows (B, N, C) -> (B, C, *spatial), a channels-last view of the rows."""
    return rows.view(rows.shape[0], *spatial, rows.shape[2]).movedim(-1, 1)


class _ContiguousFromRows(torch.autograd.Function):
    """rows (B, N, C) -> contiguous (B, C, *S), and its gradient back into contiguous
    rows: one copy each way (autograd's own would hand every block of a stage a
    strided gradient, which each one copies again)."""

    @staticmethod
    def forward(ctx, rows, spatial):
        return _spatial(rows, spatial).contiguous()

    @staticmethod
    def backward(ctx, grad):
        return _rows(grad), None


class _WeightMatrix(torch.autograd.Function):
    """A 1x1 convolution's weight as its (C_out, C_in) matrix, with the gradient given back
    in the parameter's exact strides: `module.to(memory_format=torch.channels_last)` gives
    1x1 weights strides in their size-1 dimensions that a view's gradient would not have
    (autograd counts them as matching), and DDP warns about (and copies) gradients whose
    strides differ from its buckets' at all."""

    @staticmethod
    def forward(ctx, weight):
        ctx.shape, ctx.strides = weight.shape, weight.stride()
        return weight.flatten(1)

    @staticmethod
    def backward(ctx, grad):
        return torch.empty_strided(ctx.shape, ctx.strides, dtype=grad.dtype, device=grad.device).copy_(
            grad.view(ctx.shape))


def _conv_weight(conv):
    """A 1x1 convolution's weight (C_out, C_in, 1, ...) as the (C_out, C_in) matrix."""
    return _WeightMatrix.apply(conv.weight)


def _pool_rows(pool, rows, spatial):
    """Max-pool rows over their spatial grid: (B, N, C) -> (B, M, C), and the pooled grid."""
    pooled = pool(_spatial(rows, spatial))
    return _rows(pooled), pooled.shape[2:]


def _check_options(in_channels, inter_channels, mode, dimension):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    if dimension not in _CONV:
        raise ValueError(f"dimension must be 1, 2 or 3, got {dimension!r}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be positive, got {in_channels}")
    if inter_channels is None:
        inter_channels = max(in_channels // 2, 1)
    if inter_channels < 1:
        raise ValueError(f"inter_channels must be positive, got {inter_channels}")
    return inter_channels


class Affinity(nn.Module):
    """theta and phi of one mode: rows (B, N, C) on a grid -> query (B, N, D), key (B, M, D)."""

    def __init__(self, in_channels, inter_channels, mode, sub_sample, dimension, use_scale, scale):
        super().__init__()
        conv = _CONV[dimension]
        self.kernel = MODES[mode]
        if mode == "gaussian":
            self.theta, self.phi = nn.Identity(), nn.Identity()
            width = in_channels
        else:
            self.theta = conv(in_channels, inter_channels, kernel_size=1)
            self.phi = conv(in_channels, inter_channels, kernel_size=1)
            width = inter_channels
        self.pool = _POOL[dimension]() if sub_sample else None
        if sub_sample:
            self.phi = nn.Sequential(self.phi, self.pool)  # the state-dict names of a pooled phi
        if mode == "concatenation":
            # concat_project's weight split in its theta and phi halves
            self.project_query = conv(inter_channels, 1, kernel_size=1, bias=False)
            self.project_key = conv(inter_channels, 1, kernel_size=1, bias=False)
        softmax = affinities.get(self.kernel).normalisation == "softmax"
        if scale is not None:
            if use_scale:
                raise ValueError("pass use_scale=True or an explicit scale, not both")
            self.scale = float(scale)
        else:
            self.scale = 1.0 / math.sqrt(width) if use_scale and softmax else 1.0

    def forward(self, rows, spatial, branch=None):
        """rows (B, N, C) on the grid `spatial` -> query (B, N, D), key (B, M, D), and with a
        ValueBranch `branch` its (value, center) of the same rows (ValueBranch.values)."""
        if isinstance(self.theta, nn.Identity):
            theta = phi = rows
            values = branch.values(rows, spatial) if branch is not None else ()
        else:
            # theta, phi (and the branch's g) as one projection, each part contiguous rows
            # (B, N, C') once here, not copied by every operator call of a stage
            phi_conv = self.phi[0] if self.pool is not None else self.phi
            convs = [self.theta, phi_conv] + ([branch.g] if branch is not None else [])
            weight = torch.cat([_conv_weight(conv) for conv in convs])
            embedded = linear_parts.parts(rows, weight, torch.cat([conv.bias for conv in convs]),
                                          [conv.out_channels for conv in convs])
            theta, phi = embedded[:2]
            values = branch.pooled(embedded[2], spatial) if branch is not None else ()
        if self.pool is not None:
            phi, _ = _pool_rows(self.pool, phi, spatial)
        if self.kernel == "concat":
            theta = F.linear(theta, _conv_weight(self.project_query))
            phi = F.linear(phi, _conv_weight(self.project_key))
        return (theta, phi, *values)


class ValueBranch(nn.Module):
    """g (C -> C') and W_z (C' -> C, then BatchNorm): one block's own weights."""

    def __init__(self, in_channels, inter_channels, sub_sample, bn_layer, dimension):
        super().__init__()
        conv = _CONV[dimension]
        self.g = conv(in_channels, inter_channels, kernel_size=1)
        self.pool = _POOL[dimension]() if sub_sample else None
        self.W_z = conv(inter_channels, in_channels, kernel_size=1)
        if bn_layer:
            self.bn = _BATCH_NORM[dimension](in_channels)
            nn.init.zeros_(self.bn.weight)
            nn.init.zeros_(self.bn.bias)
        else:
            self.bn = None
            nn.init.zeros_(self.W_z.weight)
            nn.init.zeros_(self.W_z.bias)

    def values(self, rows, spatial):
        """rows (B, N, C) -> (value (B, M, C') at the pooled positions, center (B, N, C'))."""
        return self.pooled(F.linear(rows, _conv_weight(self.g), self.g.bias), spatial)

    def pooled(self, center, spatial):
        """g's rows (B, N, C') -> (value at the pooled positions, center)."""
        return (_pool_rows(self.pool, center, spatial)[0] if self.pool is not None else center), center

    def project(self, y, spatial, residual, following=None):
        """(B, N, C') -> rows z (B, N, C): residual + BatchNorm(W_z y), in one operator with
        the BatchNorm's batch statistics on CPU rows (fastnl.batch_norm), else W_z on the
        rows and BatchNorm on their channels-last view. With `following` (the next block's
        branch) -> (z, following.values(z)), the values from the same operator where it runs."""
        weight = _conv_weight(self.W_z)
        rows, residual_rows = y.flatten(0, -2), residual.flatten(0, -2)
        fused = self.bn is not None and batch_norm.applies(weight, self.W_z.bias, self.bn, rows, residual_rows)
        if fused and following is not None and following.g.weight.dtype == weight.dtype:
            out, center = batch_norm.projected_batch_norm(weight, self.W_z.bias, self.bn, rows, residual_rows,
                                                          _conv_weight(following.g), following.g.bias)
            return out.view(residual.shape), following.pooled(center.view(*residual.shape[:-1], -1), spatial)
        if fused:
            out = batch_norm.projected_batch_norm(weight, self.W_z.bias, self.bn, rows, residual_rows)
            out = out.view(residual.shape)
        else:
            y = F.linear(y, weight, self.W_z.bias)
            out = residual + (y if self.bn is None else _rows(self.bn(_spatial(y, spatial))))
        return out if following is None else (out, following.values(out, spatial))

    def weight_product(self):
        """W_z W_g (C, C) with BatchNorm folded into W_z (its scale; biases dropped)."""
        w_z = self.W_z.weight.flatten(1)
        if self.bn is not None:
            w_z = (self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)).unsqueeze(1) * w_z
        return w_z @ self.g.weight.flatten(1)


class _Nonlocal(nn.Module):
    def __init__(self, in_channels, inter_channels, mode, sub_sample, bn_layer, dimension, use_scale,
                 backend, num_branches, scale=None):
        super().__init__()
        inter_channels = _check_options(in_channels, inter_channels, mode, dimension)
        self.in_channels, self.inter_channels = in_channels, inter_channels
        self.mode, self.sub_sample, self.dimension, self.backend = mode, sub_sample, dimension, backend
        self.affinity = Affinity(in_channels, inter_channels, mode, sub_sample, dimension, use_scale, scale)
        self.branches = nn.ModuleList(
            ValueBranch(in_channels, inter_channels, sub_sample, bn_layer, dimension)
            for _ in range(num_branches)
        )

    def _check_input(self, x):
        if x.dim() != self.dimension + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects (B, {self.in_channels}, "
                f"{', '.join('*' * self.dimension)}) input, got shape {tuple(x.shape)}"
            )

    def query_key(self, x):
        """query (B, N, D), key (B, M, D) of an input x (B, C, *S), as forward computes them."""
        return self.affinity(_rows(x), x.shape[2:])

    def _output(self, rows, x):
        """Result rows (B, N, C) as (B, C, *S): a view for a channels-last x; for any other
        x a contiguous result (the one copy out)."""
        if _is_channels_last(x):
            return _spatial(rows, x.shape[2:])
        return _ContiguousFromRows.apply(rows, x.shape[2:])

    def _attend(self, query, key, value, center=None, log_normalizer=None):
        return nonlocal_attend(query, key, value, center, kernel=self.affinity.kernel,
                               scale=self.affinity.scale, backend=self.backend,
                               log_normalizer=log_normalizer)

    def weight_products(self):
        """[W_z W_g] per block, each (C, C), BatchNorm folded in (for spectrum analysis)."""
        return [branch.weight_product() for branch in self.branches]

    def extra_repr(self):
        return (f"in_channels={self.in_channels}, inter_channels={self.inter_channels}, "
                f"mode={self.mode!r}, sub_sample={self.sub_sample}, dimension={self.dimension}")


class NonlocalBlock(_Nonlocal):
    """Wang et al.'s nonlocal block: z = x + W_z(aggregate(theta(x), phi(x), g(x))).

    x (B, C, *S) with len(S) == dimension -> z of the same shape. A new block is the
    identity (zero-initialised BatchNorm scale). See the module docstring for the
    choices shared with AlexHex7/Non-local_pytorch and mmcv.
    """

    def __init__(self, in_channels, inter_channels=None, mode="embedded_gaussian", sub_sample=False,
                 bn_layer=True, dimension=2, use_scale=False, backend=None, scale=None):
        super().__init__(in_channels, inter_channels, mode, sub_sample, bn_layer, dimension, use_scale,
                         backend, num_branches=1, scale=scale)

    @classmethod
    def from_state_dict(cls, state, layout, *, mode=None, use_scale=None, backend=None):
        """The block computing what a peer's block with this state_dict computes:
        layout "alexhex7", "mmcv" or "timm" (their keys and conventions: fastnl.peers)."""
        from fastnl.peers import block_from_state_dict  # it builds NonlocalBlocks

        return block_from_state_dict(state, layout, mode=mode, use_scale=use_scale, backend=backend)

    def forward(self, x):
        self._check_input(x)
        rows, spatial = _rows(x), x.shape[2:]
        branch = self.branches[0]
        query, key, value, _ = self.affinity(rows, spatial, branch)
        y, _ = self._attend(query, key, value)
        return self._output(branch.project(y, spatial, rows), x)


class NonlocalStage(_Nonlocal):
    """Tao et al.'s nonlocal stage: `num_blocks` diffusion blocks sharing one affinity.

        Z^{n+1}_i = Z^n_i + W^n( (1 / C_i(X)) sum_j w(X_i, X_j) (g^n(Z^n)_j - g^n(Z^n)_i) )

    The affinity comes from the stage input X = Z^0 only: theta(X), phi(X) are
    computed once, and for the softmax modes the first block's row log-sum-exp is
    passed to every later block (a single pass each, no statistics recomputed); in
    training, their query and key gradients are then formed once for all blocks
    (fastnl.shared_affinity). With
    `sub_sample`, j runs over the pooled positions and the center g^n(Z^n)_i over all.
    """

    def __init__(self, in_channels, num_blocks=2, inter_channels=None, mode="embedded_gaussian",
                 sub_sample=False, bn_layer=True, dimension=2, use_scale=False, backend=None, scale=None):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
        super().__init__(in_channels, inter_channels, mode, sub_sample, bn_layer, dimension, use_scale,
                         backend, num_branches=num_blocks, scale=scale)
        self.num_blocks = num_blocks

    def forward(self, x):
        self._check_input(x)
        rows, spatial = _rows(x), x.shape[2:]
        query, key, *first_values = self.affinity(rows, spatial, self.branches[0])  # the first g from X too
        # training: query and key gradients once for all blocks (fastnl.shared_affinity)
        shared = SharedAffinity.for_stage(query, key, self.inter_channels, self.affinity.kernel, self.affinity.scale,
                                          self.backend) if self.num_blocks > 1 else None
        z, log_normalizer, (value, center) = rows, None, first_values
        for index, branch in enumerate(self.branches):
            if shared is not None:
                y = shared.attend(value, center)
            else:
                y, log_normalizer = self._attend(query, key, value, center, log_normalizer)
            if index + 1 < self.num_blocks:  # the next block's g from the same operator as z
                z, (value, center) = branch.project(y, spatial, z, self.branches[index + 1])
            else:
                z = branch.project(y, spatial, z)
        return self._output(z, x)
