"""One training epoch and one evaluation pass over in-memory tensors.

Running sums stay on the device and are read back every `CHECK_EVERY` steps (and at
the end), so a GPU is not synchronised every step; a non-finite loss stops training
within that many steps instead of silently training on NaN weights.
"""
import contextlib
import math
import sys
import time

import torch
import torch.nn.functional as F

from fastnl.app.data import augment, draw_augmentation, epoch_batches, normalize, shard
from fastnl.app.distributed import Ranks

CHECK_EVERY = 20


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""


def autocast(device, amp):
    """Mixed precision context for `amp` in (None, "bf16", "fp16")."""
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def _inputs(images, dataset, channels_last):
    inputs = normalize(images, dataset)
    return inputs.contiguous(memory_format=torch.channels_last) if channels_last else inputs


class _Lines:
    """A text stream for tqdm when stderr is not a terminal: each refresh becomes one
    plain line (no carriage returns piling up in a log file), blank refreshes vanish."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self):
        self.stream.flush()


def _progress_bar(batches, description, enabled):
    """tqdm on stderr: redrawn in place every 2 s on a terminal; piped, a line every 30 s."""
    from tqdm import tqdm  # fastnl.app.data, imported above, has checked that it is installed

    if sys.stderr.isatty():
        return tqdm(batches, desc=description, file=sys.stderr, mininterval=2, disable=not enabled,
                    unit="batch", leave=False)
    return tqdm(batches, desc=description, file=_Lines(sys.stderr), mininterval=30, disable=not enabled,
                unit="batch", leave=False, ascii=True, ncols=100)


def train_one_epoch(model, optimizer, scaler, images, labels, generator, config, device, step_budget,
                    description, ranks=None):
    """SGD over one epoch (at most `step_budget` steps) -> dict of loss, acc, steps, images, seconds.

    Every rank walks the same global batches and takes its shard of each; loss,
    accuracy and the image count are summed over ranks, so all ranks see the same
    numbers and stop together on a non-finite loss. `ranks` None: one process.
    """
    ranks = ranks or Ranks()
    model.train()
    batches = epoch_batches(len(labels), config.batch_size, generator, shuffle=True, world_size=ranks.world_size)
    batches = batches[:step_budget] if step_budget is not None else batches
    totals = torch.zeros(3, device=device, dtype=torch.float64)  # loss sum, correct, images
    start = time.perf_counter()
    progress = _progress_bar(batches, description, enabled=ranks.is_main)
    for step, index in enumerate(progress, start=1):
        offsets, flips = (shard(drawn, ranks.rank, ranks.world_size)
                          for drawn in draw_augmentation(len(index), generator))
        index = shard(index, ranks.rank, ranks.world_size).to(device)
        inputs = _inputs(augment(images[index], offsets, flips), config.dataset, config.channels_last)
        targets = labels[index]
        with autocast(device, config.amp):
            logits = model(inputs)
            loss = F.cross_entropy(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        totals += torch.stack([loss.detach().double() * len(targets), (logits.argmax(1) == targets).sum(),
                               totals.new_tensor(len(targets))])
        if step % CHECK_EVERY == 0 or step == len(batches):
            loss_sum, correct, seen = ranks.sum(totals).tolist()
            if not math.isfinite(loss_sum):
                raise NonFiniteLoss(f"training loss became {loss_sum / seen} at step {step} of this epoch")
            progress.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", refresh=False)
    seconds = time.perf_counter() - start
    loss_sum, correct, seen = ranks.sum(totals).tolist()
    return {"loss": loss_sum / max(seen, 1), "acc": correct / max(seen, 1), "steps": len(batches),
            "images": int(seen), "seconds": seconds}


@torch.no_grad()
def evaluate(model, images, labels, config, device, ranks=None):
    """-> dict of mean loss and accuracy of `model` on the whole split, in eval mode.

    Each rank evaluates its shard of every batch; the sums are all-reduced, so the
    result is the whole test set's. `model` must not be the DDP wrapper (no
    collectives here but the final sum, and shards may differ in length).
    """
    ranks = ranks or Ranks()
    model.eval()
    totals = torch.zeros(2, device=device, dtype=torch.float64)  # loss sum, correct
    for index in epoch_batches(len(labels), config.batch_size, None, shuffle=False):
        index = shard(index, ranks.rank, ranks.world_size).to(device)
        if not len(index):
            continue
        with autocast(device, config.amp):
            logits = model(_inputs(images[index], config.dataset, config.channels_last))
        totals += torch.stack([F.cross_entropy(logits.float(), labels[index], reduction="sum").double(),
                               (logits.argmax(1) == labels[index]).sum().double()])
    loss_sum, correct = ranks.sum(totals).tolist()
    return {"loss": loss_sum / len(labels), "acc": correct / len(labels)}
