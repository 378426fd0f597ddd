"""Prints, after the timings, one table per problem: median, ratios and peak memory."""
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

_CASES = Path(__file__).with_name("cases.py")
_RESULTS = defaultdict(dict)  # group -> implementation -> (median seconds, peak bytes)


def peak_extra_bytes(implementation, size_index, backward):
    """Resident-set growth of one step in a fresh process (see cases.py)."""
    direction = "backward" if backward else "forward"
    done = subprocess.run([sys.executable, str(_CASES), implementation, str(size_index), direction],
                          capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def record():
    """record(benchmark, implementation, peak_bytes) after benchmark(...) has run."""

    def _record(benchmark, implementation, peak_bytes):
        benchmark.extra_info["peak_extra_MiB"] = round(peak_bytes / 2**20, 2)
        if benchmark.stats is not None:
            _RESULTS[benchmark.group][implementation] = (benchmark.stats.stats.median, peak_bytes)

    return _record


def pytest_terminal_summary(terminalreporter):
    if not _RESULTS:
        return
    write = terminalreporter.write_line
    terminalreporter.section("fastnl: medians, speed-up over reference and over SDPA, peak extra memory")
    for group, rows in _RESULTS.items():
        write(f"\n{group}")
        write(f"  {'implementation':<22}{'median ms':>11}{'x reference':>13}{'x sdpa':>9}{'peak MiB':>10}")
        reference, sdpa = rows.get("reference", (None,))[0], rows.get("sdpa", (None,))[0]
        for name, (median, peak) in rows.items():
            versus_reference = f"{reference / median:.2f}" if reference else "-"
            versus_sdpa = f"{sdpa / median:.2f}" if sdpa else "-"
            write(f"  {name:<22}{median * 1e3:>11.2f}{versus_reference:>13}{versus_sdpa:>9}{peak / 2**20:>10.1f}")
