"""CIFAR data as whole uint8 tensors, batched on-device augmentation and normalisation.

CIFAR fits in memory (50,000 x 3 x 32 x 32 bytes = 150 MiB), so the training loop
indexes one tensor instead of running a DataLoader: no per-sample Python work, no
worker processes competing for the two cores, and every random draw comes from one
seeded generator, which is what makes `--resume` exact.

`load_dataset` reads either torchvision's official python format
(`cifar-10-batches-py`, `cifar-100-python`, downloaded with torchvision when missing)
or an ImageFolder tree `train/<class>/*`, `test/<class>/*` (classes in sorted order,
as torchvision's ImageFolder assigns them). The JPEG/PNG files are decoded once and
the tensor cached as a .pt file in `cache_dir`, keyed by the tree's path and its
files' names, sizes and times, so a second run skips decoding.
"""
import hashlib
import os
import pickle
from pathlib import Path

import torch

from fastnl.app._extras import require

require("fastnl's CIFAR data loading", "numpy", "PIL", "tqdm")
import numpy as np  # noqa: E402  (after the check above)
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

# per-channel mean and std of the training images, in [0, 1]
STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
# name -> (folder, train files, test files, label key), as torchvision writes them
_OFFICIAL = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels"),
}
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp"}
PAD = 4


def default_cache_dir():
    """$FASTNL_CACHE_DIR, else ~/.cache/fastnl."""
    return Path(os.environ.get("FASTNL_CACHE_DIR", Path.home() / ".cache" / "fastnl"))


def load_dataset(name, data_dir, train, cache_dir=None):
    """-> (images uint8 (N, 3, 32, 32), labels int64 (N,)) of split train/test of `name`."""
    if name not in NUM_CLASSES:
        raise ValueError(f"dataset must be one of {sorted(NUM_CLASSES)}, got {name!r}")
    data_dir = Path(data_dir)
    split = "train" if train else "test"
    if (data_dir / "train").is_dir() and (data_dir / "test").is_dir():
        images, labels = _load_image_folder(data_dir / split, Path(cache_dir or default_cache_dir()))
    else:
        folder = data_dir / _OFFICIAL[name][0]
        if not folder.is_dir():
            _download(name, data_dir)
        images, labels = _load_official(name, folder, train)
    if labels.numel() and int(labels.max()) >= NUM_CLASSES[name]:
        raise ValueError(f"{data_dir} has labels up to {int(labels.max())}, too many for {name}")
    return images, labels


def _download(name, data_dir):
    """Fetch the official archive with torchvision, or say clearly why there is none."""
    require(f"downloading {name}", "torchvision")
    from torchvision import datasets

    dataset = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        dataset(root=str(data_dir), train=True, download=True)
    except Exception as error:  # URLError, socket and HTTP errors: all mean "no copy here"
        raise RuntimeError(
            f"{name} was not found in {data_dir} (looked for {_OFFICIAL[name][0]}/ in torchvision's "
            f"python format, or an ImageFolder tree train/<class>/ and test/<class>/) and "
            f"downloading it failed ({type(error).__name__}: {error}). Download it where the "
            f"network is reachable, e.g. torchvision.datasets.{dataset.__name__}(root, download=True), "
            f"and pass that root as --data-dir.") from error


def _load_official(name, folder, train):
    _, train_files, test_files, label_key = _OFFICIAL[name]
    images, labels = [], []
    for file in train_files if train else test_files:
        with open(folder / file, "rb") as handle:
            batch = pickle.load(handle, encoding="latin1")
        images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(batch[label_key])
    return torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.int64)


def _image_files(root):
    classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir())
    if not classes:
        raise ValueError(f"{root} has no class folders")
    return classes, [
        (path, label)
        for label, name in enumerate(classes)
        for path in sorted((root / name).iterdir())
        if path.suffix.lower() in _IMAGE_SUFFIXES
    ]


def _load_image_folder(root, cache_dir):
    classes, files = _image_files(root)
    fingerprint = hashlib.sha256(str(root.resolve()).encode())
    for path, label in files:
        stat = path.stat()
        fingerprint.update(f"{path.name}|{label}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    cache = cache_dir / f"{root.name}-{fingerprint.hexdigest()[:16]}.pt"
    if cache.exists():
        cached = torch.load(cache)
        return cached["images"], cached["labels"]
    images = torch.empty(len(files), 3, 32, 32, dtype=torch.uint8)
    for index, (path, _) in enumerate(tqdm(files, desc=f"decoding {root}", mininterval=2, disable=None)):
        with Image.open(path) as image:
            pixels = np.array(image.convert("RGB"))
        if pixels.shape != (32, 32, 3):
            raise ValueError(f"{path} is {pixels.shape[1]}x{pixels.shape[0]}, expected 32x32")
        images[index] = torch.from_numpy(pixels).permute(2, 0, 1)
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    cache_dir.mkdir(parents=True, exist_ok=True)
    temporary = cache.with_suffix(f".tmp{os.getpid()}")
    torch.save({"images": images, "labels": labels, "classes": classes}, temporary)
    os.replace(temporary, cache)
    return images, labels


def epoch_batches(num_samples, batch_size, generator, shuffle, world_size=1):
    """The global index batches (int64 tensors) of one epoch; `shard` cuts out a rank's part.

    Every rank draws the same permutation from its identically seeded generator, so
    all agree on the global order. For training under `world_size` ranks the order is
    padded to a multiple of world_size by repeating its first indices, as
    torch.utils.data.DistributedSampler does, so every rank gets equally many samples
    and batches (DDP needs the same number of steps everywhere, and equal shards make
    the average of the ranks' mean losses the mean over the global batch).
    """
    order = torch.randperm(num_samples, generator=generator) if shuffle else torch.arange(num_samples)
    padding = (-num_samples) % world_size if shuffle else 0
    return list(torch.cat([order, order[:padding]]).split(batch_size))


def shard(batch, rank, world_size):
    """Rank `rank`'s part of a global batch: every world_size-th element, from position rank."""
    return batch[rank::world_size]


def draw_augmentation(batch_size, generator):
    """The random crop offsets (B, 2: row, column) and flips (B,) of one global batch, drawn on the CPU.

    Drawn for the whole global batch on every rank, then cut with `shard` like the
    batch, so a run on K ranks sees exactly the augmentation a run on one process sees.
    """
    offsets = torch.randint(0, 2 * PAD + 1, (2, batch_size), generator=generator).T
    flips = torch.rand(batch_size, generator=generator) < 0.5
    return offsets, flips


def augment(images, offsets, flips):
    """Pad-4 crop at `offsets` (B, 2) and horizontal flip where `flips` (B,) of a batch (B, C, H, W).

    Any dtype and device; one gather, no per-sample Python.
    """
    batch, _, height, width = images.shape
    offsets, flips = offsets.to(images.device), flips.to(images.device)
    padded = torch.nn.functional.pad(images, (PAD, PAD, PAD, PAD))
    rows = offsets[:, 0, None] + torch.arange(height, device=images.device)
    cols = offsets[:, 1, None] + torch.arange(width, device=images.device)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    batch_index = torch.arange(batch, device=images.device)[:, None, None, None]
    channel_index = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return padded[batch_index, channel_index, rows[:, None, :, None], cols[:, None, None, :]]


def normalize(images, name):
    """uint8 (B, 3, H, W) -> float32 standardised with the dataset's channel mean/std."""
    mean, std = (torch.tensor(values, device=images.device).view(1, 3, 1, 1) for values in STATS[name])
    return (images.float() / 255 - mean) / std
