"""Tiny generated CIFAR-like datasets in both on-disk layouts load_dataset reads."""
import pickle

import numpy as np
import pytest
from PIL import Image

CLASSES = ["airplane", "automobile", "bird", "cat"]


def _pixels(rng, count):
    return rng.integers(0, 256, size=(count, 32, 32, 3), dtype=np.uint8)


@pytest.fixture
def image_folder(tmp_path, monkeypatch):
    """An ImageFolder tree (PNG, lossless) with 8 train and 4 test images per class."""
    monkeypatch.setenv("FASTNL_CACHE_DIR", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    root = tmp_path / "folder"
    for split, per_class in (("train", 8), ("test", 4)):
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
            for index, pixels in enumerate(_pixels(rng, per_class)):
                Image.fromarray(pixels).save(root / split / name / f"{index:04d}.png")
    return root


@pytest.fixture
def official_cifar10(tmp_path):
    """torchvision's cifar-10-batches-py layout with 6 images per batch file."""
    rng = np.random.default_rng(1)
    folder = tmp_path / "official" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": _pixels(rng, 6).transpose(0, 3, 1, 2).reshape(6, -1),
                 "labels": rng.integers(0, 10, size=6).tolist()}
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle)
    return folder.parent
