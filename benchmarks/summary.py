"""The benchmarks' one results store and summary: every suite records here, and after
pytest-benchmark's own tables one table per group (median, x reference, x SDPA, peak
extra memory) and each suite's section of ratios against its bars are printed.

A plain module rather than conftest.py: test modules import it by name, and so share
its state with the hook that prints it.
"""
import statistics
import time
from collections import defaultdict

RESULTS = defaultdict(dict)  # group -> implementation -> (median seconds, peak extra bytes or None)
VALUES = {}  # name -> a number measured outside the groups (machine rates, a peak)
_SECTIONS = []  # (title, function returning the section's lines)


def record(benchmark, implementation, peak_bytes=None):
    """Store the median of a finished benchmark (None when timing was disabled)."""
    if peak_bytes is not None:
        benchmark.extra_info["peak_extra_MiB"] = round(peak_bytes / 2**20, 2)
    if benchmark.stats is not None:
        RESULTS[benchmark.group][implementation] = (benchmark.stats.stats.median, peak_bytes)


def _paired_ratio(slower, faster, pairs):
    """Median over `pairs` of time(slower step) / time(faster step), run alternately: on a
    shared VM the machine's speed drifts between a group's rounds and the next group's."""
    ratios = []
    for _ in range(pairs):
        times = []
        for step in (slower, faster):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        ratios.append(times[0] / times[1])
    return statistics.median(ratios)


def record_paired(benchmark, bar, slower, faster, pairs):
    """Store `bar`'s paired ratio: after one warm-up call each, the median over `pairs`
    alternating calls of the steps `slower` and `faster` (one untimed pair when
    benchmarks are disabled)."""
    for step in (slower, faster):
        step()
    benchmark.group = f"paired: {bar}"
    ratio = benchmark.pedantic(_paired_ratio, args=(slower, faster, 1 if benchmark.disabled else pairs), rounds=1)
    if not benchmark.disabled:
        VALUES[f"paired: {bar}"] = ratio


def paired(bar):
    """`bar`'s paired ratio (record_paired), None if it was not timed."""
    return VALUES.get(f"paired: {bar}")


def median(group, implementation):
    entry = RESULTS.get(group, {}).get(implementation)
    return None if entry is None else entry[0]


def ratio(group, slower, faster):
    """median(slower) / median(faster) within one group, None if either was not timed."""
    slow, fast = median(group, slower), median(group, faster)
    return None if slow is None or fast is None else slow / fast


def bar_lines(bars, lower_is_better=False):
    """Lines for (name, measured ratio or None, bar or None) rows: the ratio must reach the
    bar, or stay at or below it with `lower_is_better`; untimed rows are left out."""
    sense = "at most" if lower_is_better else "needed"
    lines = [f"{'bar':<52}{'ratio':>8}{sense:>9}"]
    return lines + [f"{name:<52}{value:>8.2f}{'-' if bar is None else f'{bar:.2f}':>9}"
                    for name, value, bar in bars if value is not None]


def section(title):
    """Decorator: a function returning lines printed under `title` after the group tables."""

    def register(function):
        _SECTIONS.append((title, function))
        return function

    return register


def write(terminalreporter):
    if not RESULTS:
        return
    line = terminalreporter.write_line
    terminalreporter.section("fastnl: medians, speed-up over reference and over SDPA, peak extra memory")
    for group, rows in RESULTS.items():
        line(f"\n{group}")
        line(f"  {'implementation':<22}{'median ms':>11}{'x reference':>13}{'x sdpa':>9}{'peak MiB':>10}")
        for name, (seconds, peak) in rows.items():
            versus = [ratio(group, peer, name) for peer in ("reference", "sdpa")]
            cells = [f"{value:.2f}" if value is not None else "-" for value in versus]
            peak_cell = f"{peak / 2**20:.1f}" if peak is not None else "-"
            line(f"  {name:<22}{seconds * 1e3:>11.2f}{cells[0]:>13}{cells[1]:>9}{peak_cell:>10}")
    for title, function in _SECTIONS:
        lines = function()
        if lines:
            terminalreporter.section(title)
            for text in lines:
                line("  " + text)
