"""The query and key gradients of a stage's blocks, computed once for all of them.

A `NonlocalStage`'s K blocks share one affinity, P = exp(scale Q K^T - log_normalizer),
the first block's row log-sum-exp reused. Each block's own backward would recompute P,
form dS_k = P (dP_k - delta_k), and multiply it into dQ and dK: five products and the
exps, K times. dS is linear in dP = dO V^T and in delta, so the blocks' sums make one
dS. Here the later blocks' backwards take only their values' gradient, P^T dO_k (one
product and the exps), and hand dO_k, V_k, O_k on to the first block's, which gives dQ
and dK of all K in one pass (the backend's `softmax_shared_backward`: the blocks' dO and
V side by side in dP). Backward products: 3K + 2 instead of 5K. `NonlocalStage(32,
num_blocks=3)` fwd+bwd at B=128, 16x16 (Zen 4, paired): 1.16x faster under bf16
autocast, 1.14x in float32; its sums' backwards alone 19.6 -> 14.0 ms (bf16) and 33.0
-> 21.9 ms (float32).

The first block's backward must run after the later blocks' whose gradients it adds:
the blocks are chained, as in the stage, where every later block's value depends on the
first block's output, so autograd reaches the first block only after the later blocks
that it reaches at all. A later block autograd does not reach (a gradient of an earlier
output alone, say) adds nothing, rightly: what is differentiated does not depend on it.
Unchained blocks would lose the dQ, dK of a later block run after the first, which is
why this is the stage's tool and not a public function.

The blocks share state across one backward, which torch.compile cannot trace:
compiled, and for backends without the two operators, a stage calls
`nonlocal_attend` per block as before. Same result either way, up to rounding: here
dQ and dK are summed over the blocks before they are rounded, not after.
"""
import torch

from fastnl import affinities, backends, ops
from fastnl.functional import _operands


class SharedAffinity:
    """The blocks of one stage forward: `attend` each block's value in order.

    None from `for_stage` where the shared backward does not apply (see the module
    docstring); the stage then calls `nonlocal_attend` per block.
    """

    def __init__(self, query, key, scale, backend):
        self.query, self.key, self.scale, self.backend = query, key, scale, backend
        self.log_normalizer = None
        self.blocks = 0
        self.handed_over = {}  # later block index -> (grad_out, value, center, out) in this backward

    @classmethod
    def for_stage(cls, query, key, value_width, kernel, scale, backend):
        """A SharedAffinity for a stage's blocks, or None where they run one by one."""
        affinity = affinities.get(kernel)
        if (torch.compiler.is_compiling() or not torch.is_grad_enabled() or affinity.normalisation != "softmax"
                or affinity.prepare is not None or backend == "reference"):
            return None
        backend = backends.resolve(backend, query.device.type, (query.shape[-1], value_width), kernel)
        if not hasattr(backends.get(backend), "softmax_shared_backward"):
            return None
        return cls(query, key, float(scale), backend)

    def attend(self, value, center):
        """The next block's out (B, N, E): sum_j p_ij v_j - c_i."""
        query, key, value, center = _operands(self.query, self.key, value, center, "softmax", self.scale)
        index, self.blocks = self.blocks, self.blocks + 1
        if index == 0:
            out, self.log_normalizer = _FirstBlock.apply(query, key, value, center, self)
            return out
        return _LaterBlock.apply(query, key, value, center, self.log_normalizer, self, index)

    def hand_over(self, index, grad_out, value, center, out):
        self.handed_over[index] = (grad_out, value, center, out)

    def take_later_blocks(self):
        """[(grad_out, value, center, out)] of the later blocks that autograd has run, in
        block order; taken, so that a second backward starts empty."""
        return [self.handed_over.pop(index) for index in sorted(self.handed_over)]


class _FirstBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, center, shared):
        out, log_normalizer = ops.softmax_forward(query, key, value, center, shared.scale, shared.backend)
        ctx.save_for_backward(query, key, value, center, out, log_normalizer)
        ctx.shared, ctx.center_is_value = shared, center is value
        ctx.mark_non_differentiable(log_normalizer)
        return out, log_normalizer

    @staticmethod
    def backward(ctx, grad_out, grad_log_normalizer):
        query, key, value, center, out, log_normalizer = ctx.saved_tensors
        center = value if ctx.center_is_value else center
        later = ctx.shared.take_later_blocks()
        grad_outs, values, centers, outs = ([part[i] for part in later] for i in range(4))
        grad_query, grad_key, grad_value = ops.softmax_shared_backward(
            [grad_out, *grad_outs], query, key, [value, *values], [center, *centers] if center is not None else [],
            [out, *outs], log_normalizer, ctx.shared.scale, ctx.shared.backend)
        return (grad_query, grad_key,
                *ops.value_and_center_grads(grad_value, grad_out, center is not None, ctx.center_is_value), None)


class _LaterBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, center, log_normalizer, shared, index):
        out = ops.softmax_forward_with_log_normalizer(query, key, value, center, log_normalizer, shared.scale,
                                                      shared.backend)
        ctx.save_for_backward(query, key, value, center, out, log_normalizer)
        ctx.shared, ctx.index, ctx.center_is_value = shared, index, center is value
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, center, out, log_normalizer = ctx.saved_tensors
        center = value if ctx.center_is_value else center
        grad_value = ops.softmax_values_backward(grad_out, query, key, log_normalizer, ctx.shared.scale,
                                                 ctx.shared.backend)
        ctx.shared.hand_over(ctx.index, grad_out, value, center, out)
        # the query and key gradients: in the first block's backward, with every block's
        return (None, None, *ops.value_and_center_grads(grad_value, grad_out, center is not None, ctx.center_is_value),
                None, None, None)
