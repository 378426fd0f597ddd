"""Train with `python -m fastnl.train`'s arguments, then print one JSON line: the last
epoch's images/s, the run's wall time and the peak CUDA memory (scripts/gpu_check.sh)."""
import json
import sys
import time
from pathlib import Path

import torch

from fastnl.app.train import main, parser

start = time.perf_counter()
status = main(sys.argv[1:])
out = Path(parser().parse_args(sys.argv[1:]).out)
history = json.loads((out / "log.json").read_text())
peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
print(json.dumps({"out": str(out), "status": status, "images_per_s": history[-1]["images_per_s"],
                  "train_loss": history[-1]["train_loss"], "wall_s": time.perf_counter() - start,
                  "peak_cuda_mib": peak}))
sys.exit(status)
