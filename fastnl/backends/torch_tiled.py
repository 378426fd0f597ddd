"""The "torch" backend: memory-light operators in plain PyTorch, on any device.

softmax streams over key tiles with an online softmax (FlashAttention's recurrence),
keeps only the row log-sum-exp, and recomputes each tile in the backward, so the extra
memory is O(N x KEY_TILE), never N x M. dot and concat are exact and not quadratic:
dot by associativity, concat by sorting keys and suffix sums. Half-precision inputs
are computed in float32 and rounded once at the end.
"""
import torch

from fastnl.backends import accumulate_dtype

KEY_TILE = 128  # keys per tile: (B, N, 128) logits at a time; 256 held 80% of the reference's peak at B=16, N=1024


def unavailable_reason(device_type):
    return None


# The shifted logit below which e^x is a denormal (float32: below 1.2e-38). On x86
# CPUs every operation that reads or writes a denormal takes a microcode assist, and a
# trained block's sharp affinity produces many; clamping there changes a row sum >= 1
# by less than 1e-38 and removes most of them (the benchmarks' "logits x 10" group
# times it). The rest are denormal products inside the matmuls, which only a
# flush-to-zero mode on torch's worker threads would remove.
_DENORMAL_BELOW = {torch.float32: -87.3, torch.float64: -708.3}


def _exp(shifted):
    """e^shifted for a temporary of shifted logits (<= 0), clamped in place on CPU so
    that no result is denormal; NaN stays NaN."""
    if shifted.device.type == "cpu":
        shifted.clamp_min_(_DENORMAL_BELOW[shifted.dtype])
    return torch.exp(shifted)


def _key_tiles(num_keys):
    for start in range(0, num_keys, KEY_TILE):
        yield slice(start, min(start + KEY_TILE, num_keys))


def softmax_forward(query, key, value, center, log_normalizer, scale):
    acc = accumulate_dtype(query.dtype)
    scaled_query = query.to(acc) * scale
    batch, num_queries, _ = query.shape
    out = scaled_query.new_zeros(batch, num_queries, value.shape[2])
    if log_normalizer is not None:
        # statistics known: one pass, no rescaling
        shift = log_normalizer.to(acc).unsqueeze(-1)
        for tile in _key_tiles(key.shape[1]):
            logits = scaled_query @ key[:, tile].to(acc).transpose(1, 2)
            out.baddbmm_(_exp(logits - shift), value[:, tile].to(acc))
    else:
        row_max = scaled_query.new_full((batch, num_queries, 1), float("-inf"))
        row_sum = scaled_query.new_zeros(batch, num_queries, 1)
        for tile in _key_tiles(key.shape[1]):
            logits = scaled_query @ key[:, tile].to(acc).transpose(1, 2)
            new_max = torch.maximum(row_max, logits.amax(dim=-1, keepdim=True))
            # running max changed: rescale what was accumulated under the old one
            correction = torch.exp(row_max - new_max)
            probs = _exp(logits - new_max)
            row_sum = row_sum * correction + probs.sum(dim=-1, keepdim=True)
            out.mul_(correction).baddbmm_(probs, value[:, tile].to(acc))
            row_max = new_max
        out.div_(row_sum)
        log_normalizer = (row_max + torch.log(row_sum)).squeeze(-1)
    if center is not None:
        out.sub_(center.to(acc))
    return out.to(query.dtype), log_normalizer


def softmax_backward(grad_out, query, key, value, center, out, log_normalizer, scale):
    acc = accumulate_dtype(query.dtype)
    scaled_query = query.to(acc) * scale
    grad_out = grad_out.to(acc)
    aggregate = out.to(acc) if center is None else out.to(acc) + center.to(acc)
    # delta_i = sum_j p_ij dp_ij = dO_i . aggregate_i (FlashAttention-2's preprocessing)
    delta = (grad_out * aggregate).sum(dim=-1, keepdim=True)
    shift = log_normalizer.to(acc).unsqueeze(-1)
    grad_query = torch.zeros_like(scaled_query)
    grad_key = torch.empty(key.shape, dtype=acc, device=key.device)
    grad_value = torch.empty(value.shape, dtype=acc, device=value.device)
    for tile in _key_tiles(key.shape[1]):
        key_tile, value_tile = key[:, tile].to(acc), value[:, tile].to(acc)
        probs = _exp(scaled_query @ key_tile.transpose(1, 2) - shift)
        grad_value[:, tile] = probs.transpose(1, 2) @ grad_out
        grad_logits = probs * (grad_out @ value_tile.transpose(1, 2) - delta)
        grad_query.baddbmm_(grad_logits, key_tile)
        grad_key[:, tile] = grad_logits.transpose(1, 2) @ scaled_query
    grad_query.mul_(scale)
    return grad_query.to(query.dtype), grad_key.to(key.dtype), grad_value.to(value.dtype)


def dot_forward(query, key, value, center, scale):
    acc = accumulate_dtype(query.dtype)
    dtype = query.dtype
    query, key, value = query.to(acc), key.to(acc), value.to(acc)
    factor = scale / key.shape[1]
    key_value = key.transpose(1, 2) @ value  # (B, D, E): sum_j k_j v_j^T
    out = factor * (query @ key_value)
    row_weight = factor * (query @ key.sum(dim=1).unsqueeze(-1)).squeeze(-1)
    if center is not None:
        out.sub_(row_weight.unsqueeze(-1) * center.to(acc))
    return out.to(dtype), row_weight


def dot_backward(grad_out, query, key, value, center, scale):
    acc = accumulate_dtype(query.dtype)
    dtype = query.dtype
    query, key, value, grad_out = query.to(acc), key.to(acc), value.to(acc), grad_out.to(acc)
    factor = scale / key.shape[1]
    key_value = key.transpose(1, 2) @ value
    grad_key_value = factor * (query.transpose(1, 2) @ grad_out)  # (B, D, E)
    grad_query = factor * (grad_out @ key_value.transpose(1, 2))
    grad_key = value @ grad_key_value.transpose(1, 2)
    grad_value = key @ grad_key_value
    if center is not None:
        center_grad = (grad_out * center.to(acc)).sum(dim=-1, keepdim=True)  # (B, N, 1)
        grad_query.sub_(factor * center_grad * key.sum(dim=1, keepdim=True))
        grad_key.sub_(factor * (query.transpose(1, 2) @ center_grad).transpose(1, 2))
    return grad_query.to(dtype), grad_key.to(dtype), grad_value.to(dtype)


def _suffix_sums(values):
    """(B, M, F) -> (B, M + 1, F): row r holds sum_{k >= r} values[:, k]; row M is zero."""
    sums = values.flip(1).cumsum(dim=1).flip(1)
    return torch.cat([sums, sums.new_zeros(sums.shape[0], 1, sums.shape[2])], dim=1)


def _sorted_suffix_sums(thresholds, sort_by, columns):
    """For each threshold t_i: sum of columns over the rows r with sort_by[r] > -t_i.

    relu(a_i + b_j) > 0 exactly when b_j > -a_i, so after sorting b once every row's
    set of active keys is a suffix. Returns the (B, N, F) sums of the columns and of
    the columns weighted by sort_by.
    """
    sorted_keys, order = sort_by.sort(dim=-1)
    columns = columns.gather(1, order.unsqueeze(-1).expand_as(columns))
    columns = torch.cat([columns, sorted_keys.unsqueeze(-1) * columns], dim=-1)
    first_active = torch.searchsorted(sorted_keys, (-thresholds).contiguous(), right=True)
    suffix = _suffix_sums(columns)
    sums = suffix.gather(1, first_active.unsqueeze(-1).expand(-1, -1, columns.shape[-1]))
    # a NaN key or value reaches every row in the materialised form (relu(NaN), 0 * NaN);
    # the suffix a row gathers may miss it, so add 0 * the column totals
    sums = sums + 0 * suffix[:, :1]
    plain, weighted = sums.chunk(2, dim=-1)
    return plain, weighted


def concat_forward(query, key, value, center, scale):
    acc = accumulate_dtype(query.dtype)
    a, b = query[..., 0].to(acc), key[..., 0].to(acc)
    factor = scale / key.shape[1]
    ones = torch.ones_like(b).unsqueeze(-1)
    # columns [v, 1] and their b-weighted twins [b v, b]
    plain, weighted = _sorted_suffix_sums(a, b, torch.cat([value.to(acc), ones], dim=-1))
    sums = a.unsqueeze(-1) * plain + weighted  # [sum_j w v_j, sum_j w] without the factor
    out = factor * sums[..., :-1]
    row_weight = factor * sums[..., -1]
    if center is not None:
        out.sub_(row_weight.unsqueeze(-1) * center.to(acc))
    return out.to(value.dtype), row_weight


def concat_backward(grad_out, query, key, value, center, scale):
    acc = accumulate_dtype(query.dtype)
    dtype = query.dtype
    a, b = query[..., 0].to(acc), key[..., 0].to(acc)
    value, grad_out = value.to(acc), grad_out.to(acc)
    factor = scale / key.shape[1]
    # rows i: sum over active keys j of v_j (and of 1, for the center term)
    ones = torch.ones_like(b).unsqueeze(-1)
    plain, _ = _sorted_suffix_sums(a, b, torch.cat([value, ones], dim=-1))
    grad_a = (grad_out * plain[..., :-1]).sum(dim=-1)
    # keys j: sums over the queries i with a_i > -b_j, by the same sort on a
    query_columns = [grad_out]
    if center is not None:
        center_grad = (grad_out * center.to(acc)).sum(dim=-1, keepdim=True)  # (B, N, 1)
        grad_a.sub_(center_grad.squeeze(-1) * plain[..., -1])
        query_columns.append(center_grad)
    plain_q, weighted_q = _sorted_suffix_sums(b, a, torch.cat(query_columns, dim=-1))
    grad_value = weighted_q[..., : value.shape[-1]] + b.unsqueeze(-1) * plain_q[..., : value.shape[-1]]
    grad_b = (value * plain_q[..., : value.shape[-1]]).sum(dim=-1)
    if center is not None:
        grad_b.sub_(plain_q[..., -1])
    return (
        (factor * grad_a).unsqueeze(-1).to(dtype),
        (factor * grad_b).unsqueeze(-1).to(dtype),
        (factor * grad_value).to(dtype),
    )
