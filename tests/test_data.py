"""Data: both on-disk layouts, the decode cache, the no-network error, augmentation."""
import urllib.error

import pytest
import torch
import torchvision.datasets.cifar

from fastnl.app.data import PAD, augment, draw_augmentation, epoch_batches, load_dataset, normalize, shard


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


def test_augment_crops_and_flips_each_image_as_drawn():
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    offsets, flips = draw_augmentation(6, torch.Generator().manual_seed(0))
    assert flips.any() and not flips.all()  # this seed exercises both branches
    out = augment(images, offsets, flips)
    assert out.shape == images.shape and out.dtype == images.dtype
    padded = torch.nn.functional.pad(images, (PAD,) * 4)
    for image, source, (dy, dx), flip in zip(out, padded, offsets.tolist(), flips):
        crop = source[:, dy:dy + 32, dx:dx + 32]
        assert torch.equal(image, crop.flip(2) if flip else crop)
    assert torch.equal(augment(images.float(), offsets, flips), out.float())


def test_draws_are_seeded():
    first, second = (draw_augmentation(8, torch.Generator().manual_seed(3)) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_normalize():
    assert normalize(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), "cifar10").dtype == torch.float32


def test_training_batches_shard_evenly_over_ranks():
    # 10 samples on 4 ranks: padded to 12 with the first two indices again, 3 batches of 4
    batches = epoch_batches(10, 4, torch.Generator().manual_seed(0), True, world_size=4)
    assert [len(batch) for batch in batches] == [4, 4, 4]
    order = torch.cat(batches)
    assert sorted(order[:10].tolist()) == list(range(10)) and torch.equal(order[10:], order[:2])
    parts = [[shard(batch, rank, 4) for batch in batches] for rank in range(4)]
    assert all([len(part) for part in rank_parts] == [1, 1, 1] for rank_parts in parts)
    assert sorted(torch.cat([torch.cat(rank_parts) for rank_parts in parts]).tolist()) == sorted(order.tolist())
    # one process: the plain permutation, unpadded, as before sharding existed
    alone = torch.cat(epoch_batches(10, 4, torch.Generator().manual_seed(0), True))
    assert torch.equal(alone, torch.randperm(10, generator=torch.Generator().manual_seed(0)))


def test_evaluation_batches_are_never_padded():
    assert torch.equal(torch.cat(epoch_batches(10, 4, None, False, world_size=4)), torch.arange(10))
