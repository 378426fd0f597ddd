"""Data: both on-disk layouts, the decode cache, the no-network error, augmentation."""
import urllib.error

import pytest
import torch
import torchvision.datasets.cifar

from fastnl.data import PAD, augment, epoch_batches, load_dataset, normalize


def test_image_folder_and_cache(image_folder, tmp_path):
    images, labels = load_dataset("cifar10", image_folder, train=True)
    assert images.shape == (32, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and labels.tolist() == [c for c in range(4) for _ in range(8)]
    cached = list((tmp_path / "cache").glob("train-*.pt"))
    assert len(cached) == 1
    torch.save({"images": images + 1, "labels": labels}, cached[0])  # a second run reads the cache
    assert torch.equal(load_dataset("cifar10", image_folder, train=True)[0], images + 1)


def test_official_format(official_cifar10):
    images, labels = load_dataset("cifar10", official_cifar10, train=True)
    assert images.shape == (30, 3, 32, 32) and images.dtype == torch.uint8 and labels.shape == (30,)
    assert load_dataset("cifar10", official_cifar10, train=False)[0].shape == (6, 3, 32, 32)


def test_missing_data_without_network_is_a_clear_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    with pytest.raises(RuntimeError, match="was not found in .* downloading it failed .*--data-dir"):
        load_dataset("cifar10", tmp_path, train=True)


def test_augment_is_a_seeded_crop_or_flip_of_each_image():
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    out = augment(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == images.dtype
    assert torch.equal(out, augment(images, torch.Generator().manual_seed(0)))
    padded = torch.nn.functional.pad(images, (PAD,) * 4)
    for image, source in zip(out, padded):
        offsets = range(2 * PAD + 1)
        crops = [source[:, dy:dy + 32, dx:dx + 32] for dy in offsets for dx in offsets]
        assert any(torch.equal(image, crop) or torch.equal(image, crop.flip(2)) for crop in crops)
    floats = augment(images.float(), torch.Generator().manual_seed(0))
    assert floats.dtype == torch.float32 and torch.equal(floats, out.float())


def test_normalize_and_sharding():
    assert normalize(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), "cifar10").dtype == torch.float32
    shards = [torch.cat(epoch_batches(10, 3, torch.Generator().manual_seed(0), True, rank, 2)) for rank in (0, 1)]
    assert sorted(torch.cat(shards).tolist()) == list(range(10))
