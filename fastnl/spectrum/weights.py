"""Spectrum of the symmetrised weight product W = W_z W_g of every nonlocal block.

Tao et al. (NeurIPS 2018) analyse trained networks through the eigenvalues of
(W + W^T) / 2: a block adds W applied to its aggregated values to the residual
stream, and the symmetric part decides whether that update damps (negative
eigenvalues) or amplifies (positive) along each direction. Mostly negative spectra
in stacked original blocks are the paper's explanation for their instability.
"""
import torch

from fastnl.spectrum.discover import block_names, nonlocal_modules


def symmetric_eigenvalues(weight):
    """All eigenvalues of (W + W^T) / 2 for a square W (C, C), float64, descending.

    float64 because the interesting quantity is a sign: near-zero eigenvalues of a
    rank-deficient product (rank W <= C') must not flip sign by float32 rounding.
    """
    weight = weight.detach().to(torch.float64)
    return torch.linalg.eigvalsh((weight + weight.T) / 2).flip(0)


def zero_tolerance(eigenvalues):
    """|lambda| at or below this counts as zero: numpy.linalg.matrix_rank's default.

    W_z W_g has rank at most C' = C/2, so its symmetric part has eigenvalues that are
    zero up to rounding; counting them as negative would inflate the fraction.
    """
    return eigenvalues.abs().max().item() * len(eigenvalues) * torch.finfo(eigenvalues.dtype).eps


def spectrum_summary(eigenvalues, top):
    """The numbers reported for one block, from all its eigenvalues (descending).

    `eigenvalues`: the `top` of largest magnitude, sorted descending (the plotted
    series); `negative_fraction`: over those `top` (what the figure shows);
    `negative_fraction_all`: over all C; `max_positive` / `max_negative`: the largest
    eigenvalue above zero and the most negative one below (None when there is none).
    """
    tolerance = zero_tolerance(eigenvalues)
    largest = eigenvalues[eigenvalues.abs().argsort(descending=True, stable=True)[:top]]
    largest = largest.sort(descending=True).values
    positive, negative = eigenvalues[eigenvalues > tolerance], eigenvalues[eigenvalues < -tolerance]
    return {
        "num_eigenvalues": len(eigenvalues),
        "eigenvalues": largest.tolist(),
        "negative_fraction": (largest < -tolerance).double().mean().item(),
        "negative_fraction_all": len(negative) / len(eigenvalues),
        "max_positive": positive.max().item() if len(positive) else None,
        "max_negative": negative.min().item() if len(negative) else None,
        "zero_tolerance": tolerance,
    }


def weight_spectra(model, top=32):
    """One record per nonlocal block of `model` (each branch of a stage is a block).

    Record: name (ValueBranch path), module (path of its NonlocalBlock/Stage), type,
    block (index in the module), mode, channels (C), then `spectrum_summary`.
    """
    records = []
    for path, module in nonlocal_modules(model):
        with torch.no_grad():
            products = module.weight_products()
        for index, (name, product) in enumerate(zip(block_names(path, module), products)):
            records.append({
                "name": name,
                "module": path,
                "type": type(module).__name__,
                "block": index,
                "mode": module.mode,
                "channels": product.shape[0],
                **spectrum_summary(symmetric_eigenvalues(product), top),
            })
    return records
