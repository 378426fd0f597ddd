"""memory_picture.py end to end on small cases (the real run is its `measure` command)."""
import json

import memory_picture


def test_measure_then_plot(tmp_path):
    # N = 1024 and 4096: the materialised block's 4 MiB matrices register in the resident
    # set; under a 64 MiB limit its prediction for N = 4096 (>= 64 MiB a matrix) stops it
    family = [dict(batch=1, channels=8, spatial=(side, side)) for side in (32, 64)]
    out = tmp_path / "memory.json"
    memory_picture.measure(out, {"image 2D": family}, limit_bytes=64 * 2**20)
    rows = json.loads(out.read_text())["families"]["image 2D"]["cases"]
    assert [row["positions"] for row in rows] == [1024, 4096]
    assert all(row[name]["peak_bytes"] >= 0 and "seconds" in row[name]
               for row in rows for name in memory_picture.IMPLEMENTATIONS if name != "materialised")
    assert rows[0]["materialised"]["peak_bytes"] >= 4 * 2**20 and "seconds" in rows[0]["materialised"]
    assert rows[1]["materialised"]["computed"] and rows[1]["materialised"]["peak_bytes"] >= 64 * 2**20
    memory_picture.plot(out, tmp_path / "memory.png")
    assert (tmp_path / "memory.png").stat().st_size > 0
