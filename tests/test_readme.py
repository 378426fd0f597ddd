"""The README's Quickstart and "Using fastnl in your own model" examples run as written."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _examples(heading="Using fastnl in your own model"):
    section = README.read_text().split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_quickstart_runs():
    (quickstart,) = _examples("Quickstart")
    exec(compile(quickstart, "README quickstart", "exec"), {})


def test_the_section_has_one_example_per_family():
    assert len(_examples()) == 2


@pytest.mark.parametrize("index", range(2), ids=["image", "video"])
def test_example_runs(index):
    pytest.importorskip("torchvision")
    exec(compile(_examples()[index], f"README example {index}", "exec"), {})
