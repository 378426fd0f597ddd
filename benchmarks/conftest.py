"""The benchmarks' shared fixtures: `record` (into summary.py) and the peak-memory probe."""
import subprocess
import sys
from pathlib import Path

import pytest
import summary

_CASES = Path(__file__).with_name("cases.py")


def peak_extra_bytes(implementation, size_index, backward):
    """Resident-set growth of one step in a fresh process (see cases.py)."""
    direction = "backward" if backward else "forward"
    done = subprocess.run([sys.executable, str(_CASES), implementation, str(size_index), direction],
                          capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def record():
    """record(benchmark, implementation, peak_bytes=None) after benchmark(...) has run."""
    return summary.record


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter):
    summary.write(terminalreporter)
