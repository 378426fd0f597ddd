"""The affinity P of each nonlocal module on real inputs, and the stability disc.

With a softmax kernel P = [w(i, j) / C_i] is row-stochastic, so the stage's update
(P - I) v is the generator of a Markov jump process: by Gershgorin every eigenvalue
of P - I lies in the disc |lambda + 1| <= 1 (docs/design.md, "Why the stage is stable"). This
module checks that on a trained model: it captures each module's input with forward
hooks, rebuilds P with the reference formula, and measures how far the eigenvalues
of P - I stray outside the disc (zero up to rounding when the theory holds).
"""
import torch

from fastnl._probe import captured_forward
from fastnl.app.spectrum.discover import nonlocal_modules
from fastnl.reference import normalized_affinity


def capture_inputs(model, images):
    """{path: input (B, C, *S)} of every nonlocal module for one forward of `images`.

    The model runs in eval mode (BatchNorm on running statistics, as at test time)
    and is put back in the mode it was in. For a NonlocalStage the captured input is
    the stage input X, which alone determines the affinity of all its blocks.
    """
    modules = nonlocal_modules(model)
    captured = captured_forward(model, images, dict(modules), inputs=True)
    missing = [path for path, _ in modules if path not in captured]
    if missing:
        raise RuntimeError(f"nonlocal modules not called by the model's forward: {missing}")
    return [(path, module, captured[path]) for path, module in modules]


def module_affinity(module, inputs):
    """P (B, N, M) of a NonlocalBlock/Stage for its inputs (B, C, *S), in float64.

    The embeddings run as the model runs them; P itself is formed in float64 so that
    rounding stays far below any real departure from the disc.
    """
    with torch.no_grad():
        query, key = module.query_key(inputs)
    return normalized_affinity(query.double(), key.double(), kernel=module.affinity.kernel,
                               scale=module.affinity.scale)


def disc_distance(eigenvalues):
    """Largest distance of complex eigenvalues outside the disc |lambda + 1| <= 1 (0 inside)."""
    return ((eigenvalues + 1).abs() - 1).clamp(min=0).max().item()


def affinity_report(module, inputs):
    """(record, eigenvalues of P - I (B, N) complex or None) for one module.

    Record: mode, kernel, positions N, keys M, images B, markov (whether P is a Markov
    matrix by construction), row_sum_error = max |sum_j P_ij - 1| and min_entry
    (softmax only), disc_distance (square softmax P only), and a note saying why a
    check was skipped.
    """
    affinity = module_affinity(module, inputs)
    batch, positions, keys = affinity.shape
    record = {"mode": module.mode, "kernel": module.affinity.kernel, "images": batch,
              "positions": positions, "keys": keys, "markov": module.affinity.kernel == "softmax",
              "row_sum_error": None, "min_entry": None, "disc_distance": None, "note": None}
    if not record["markov"]:
        record["note"] = (f"{module.mode} normalises by the number of keys M, not by the row sum: "
                          "P is not a Markov matrix, so the disc bound does not apply (not checked)")
        return record, None
    record["row_sum_error"] = (affinity.sum(dim=-1) - 1).abs().max().item()
    record["min_entry"] = affinity.min().item()
    if positions != keys:
        record["note"] = (f"sub_sample: P is {positions} x {keys}, not square, so P - I and its "
                          "spectrum are undefined (disc not checked)")
        return record, None
    eigenvalues = torch.linalg.eigvals(affinity - torch.eye(positions, dtype=affinity.dtype))
    record["disc_distance"] = disc_distance(eigenvalues)
    return record, eigenvalues


def affinity_spectra(model, images):
    """[(record, eigenvalues or None)] per nonlocal module of `model` on `images` (B, C, H, W).

    One record per module, not per block: a stage's blocks share one affinity.
    Records carry `module` (path) and `type` besides `affinity_report`'s fields.
    """
    results = []
    for path, module, inputs in capture_inputs(model, images):
        record, eigenvalues = affinity_report(module, inputs)
        results.append(({"module": path, "type": type(module).__name__, **record}, eigenvalues))
    return results
