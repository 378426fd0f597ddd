"""Spectrum of the symmetrised weight product W = W_z W_g of every nonlocal block.

Tao et al. (NeurIPS 2018) analyse trained networks through the eigenvalues of
(W + W^T) / 2: a block adds W applied to its aggregated values to the residual
stream, and the symmetric part decides whether that update damps (negative
eigenvalues) or amplifies (positive) along each direction. The paper finds these
spectra of trained networks mostly negative (damping), the starting point of its
stability argument.
"""
import torch

from fastnl.app.spectrum.discover import block_names, nonlocal_modules


def symmetric_eigenvalues(weight):
    """All eigenvalues of (W + W^T) / 2 for a square W (C, C), float64, descending.

    float64 so that the eigensolver adds no rounding of its own to the product's.
    """
    weight = weight.detach().to(torch.float64)
    return torch.linalg.eigvalsh((weight + weight.T) / 2).flip(0)


def zero_tolerance(eigenvalues, dtype):
    """|lambda| at or below this counts as zero: numpy.linalg.matrix_rank's default,
    max |lambda| * C * eps, with the eps of `dtype`, the precision W was computed in.

    W_z W_g has rank at most C', so its symmetric part can have eigenvalues that are
    zero up to the rounding of the product; counting them as negative or positive
    would make the fractions depend on rounding.
    """
    return eigenvalues.abs().max().item() * len(eigenvalues) * torch.finfo(dtype).eps


def spectrum_summary(eigenvalues, top, dtype):
    """The numbers reported for one block, from all its eigenvalues (descending) of a W
    computed in `dtype`.

    `eigenvalues`: the `top` of largest magnitude, sorted descending (the plotted
    series); `negative_fraction`: over those `top` (what the figure shows);
    `negative_fraction_all`: over all C; `negative_weight`: the negative eigenvalues'
    share of sum |lambda| (0 for W = 0); `max_positive` / `max_negative`: the largest
    eigenvalue above zero and the most negative one below (None when there is none).

    Why `negative_weight`: W = W_z W_g = A B has rank r <= C', and its symmetric part
    is U J U^T / 2 with U = [A, B^T] and J = [[0, I], [I, 0]], so by Sylvester's law
    of inertia a generic product with 2r <= C (the default C' = C/2 included) has
    exactly r positive and r negative eigenvalues, trained or not: the signs' count
    says little, their magnitudes say what training did.
    """
    tolerance = zero_tolerance(eigenvalues, dtype)
    largest = eigenvalues[eigenvalues.abs().argsort(descending=True, stable=True)[:top]]
    largest = largest.sort(descending=True).values
    positive, negative = eigenvalues[eigenvalues > tolerance], eigenvalues[eigenvalues < -tolerance]
    magnitude = eigenvalues.abs().sum().item()
    return {
        "num_eigenvalues": len(eigenvalues),
        "eigenvalues": largest.tolist(),
        "negative_fraction": (largest < -tolerance).double().mean().item(),
        "negative_fraction_all": len(negative) / len(eigenvalues),
        "negative_weight": negative.abs().sum().item() / magnitude if magnitude else 0.0,
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
                **spectrum_summary(symmetric_eigenvalues(product), top, product.dtype),
            })
    return records
