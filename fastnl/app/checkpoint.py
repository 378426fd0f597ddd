"""Checkpoints: atomic saving, and rebuilding a trained model from one file.

A checkpoint is a dict saved with torch.save; training writes
`{"model", "optimizer", "scheduler", "scaler", "rng", "epoch", "step", "history",
"config"}`, where
`config["model"]` holds exactly the keyword arguments of `fastnl.models.build_model`,
so analysis code (e.g. `python -m fastnl.spectrum`) needs nothing but the file.
"""
import os
import tempfile
from pathlib import Path

import torch

from fastnl.models import build_model

CHECKPOINT = "checkpoint.pt"  # the file a run keeps in its --out


def save_checkpoint(path, state):
    """torch.save `state` to `path` atomically: a reader sees the old file or the new one.

    Writes a temporary file in the same directory (same filesystem, so os.replace is
    an atomic rename) and never leaves a half-written checkpoint after a crash.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(state, file)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def load_checkpoint(path, map_location="cpu"):
    """The saved dict (weights_only: checkpoints hold tensors, numbers, strings only)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def load_model(path, map_location="cpu"):
    """-> (model in eval mode with the trained weights, the run's config dict)."""
    state = load_checkpoint(path, map_location)
    config = state["config"]
    model = build_model(**config["model"])
    model.load_state_dict(state["model"])
    return model.to(map_location).eval(), config
