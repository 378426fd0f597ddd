"""One model's analysis as a JSON-ready dict, and a short text summary of it.

Kept apart from the CLI so that tests and notebooks can analyse any nn.Module
without a checkpoint file or a data set.
"""
from fastnl.app.spectrum.affinity import affinity_spectra
from fastnl.app.spectrum.weights import weight_spectra


def analyze(model, top=32, images=None):
    """(report, spectra) for `model`; `images` (K, C, H, W), already normalised, or None.

    report: {"blocks": weight_spectra records, "affinity": affinity records or None}.
    spectra: [(affinity record, eigenvalues of P - I (K, N))] for the modules that have
    a spectrum (square softmax P), for plotting; [] without images.
    """
    report = {"blocks": weight_spectra(model, top), "affinity": None}
    spectra = []
    if images is not None:
        results = affinity_spectra(model, images)
        report["affinity"] = [record for record, _ in results]
        spectra = [(record, eigenvalues) for record, eigenvalues in results if eigenvalues is not None]
    return report, spectra


def _number(value):
    return "-" if value is None else f"{value:+.4f}"


def summary_lines(label, report):
    """Human-readable lines: one per block, then one per affinity record."""
    lines = [f"{label}: {len(report['blocks'])} nonlocal blocks"]
    for block in report["blocks"]:
        lines.append(f"  {block['name']:<32} negative {block['negative_fraction']:6.1%} of top "
                     f"{len(block['eigenvalues']):<3} negative weight {block['negative_weight']:6.1%}  "
                     f"max+ {_number(block['max_positive'])}  max- {_number(block['max_negative'])}")
    for record in report["affinity"] or []:
        if record["markov"]:
            outside = "-" if record["disc_distance"] is None else f"{record['disc_distance']:.2e}"
            detail = (f"row-sum error {record['row_sum_error']:.2e}  outside disc {outside}  "
                      f"(N={record['positions']}, M={record['keys']}, {record['images']} images)")
        else:
            detail = "not a Markov matrix: disc not checked"
        lines.append(f"  affinity {record['module']:<23} {detail}")
    return lines
