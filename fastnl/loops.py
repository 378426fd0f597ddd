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
from tqdm import tqdm

from fastnl.data import augment, epoch_batches, normalize

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


def train_one_epoch(model, optimizer, scaler, images, labels, generator, config, device, step_budget,
                    description):
    """SGD over one epoch (at most `step_budget` steps) -> dict of loss, acc, steps, images, seconds."""
    model.train()
    batches = epoch_batches(len(labels), config.batch_size, generator, shuffle=True)
    batches = batches[:step_budget] if step_budget is not None else batches
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen, start = 0, time.perf_counter()
    progress = tqdm(batches, desc=description, file=sys.stderr, mininterval=2, disable=None,
                    unit="batch", leave=False)
    for step, index in enumerate(progress, start=1):
        index = index.to(device)
        inputs = _inputs(augment(images[index], generator), config.dataset, config.channels_last)
        targets = labels[index]
        with autocast(device, config.amp):
            logits = model(inputs)
            loss = F.cross_entropy(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss_sum += loss.detach().float() * len(targets)
        correct += (logits.argmax(1) == targets).sum()
        seen += len(targets)
        if step % CHECK_EVERY == 0 or step == len(batches):
            mean_loss = loss_sum.item() / seen
            if not math.isfinite(mean_loss):
                raise NonFiniteLoss(f"training loss became {mean_loss} at step {step} of this epoch")
            progress.set_postfix(loss=f"{mean_loss:.3f}", acc=f"{correct.item() / seen:.3f}", refresh=False)
    seconds = time.perf_counter() - start
    return {"loss": loss_sum.item() / max(seen, 1), "acc": correct.item() / max(seen, 1),
            "steps": len(batches), "images": seen, "seconds": seconds}


@torch.no_grad()
def evaluate(model, images, labels, config, device):
    """-> dict of mean loss and accuracy of `model` on the whole split, in eval mode."""
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    for index in epoch_batches(len(labels), config.batch_size, None, shuffle=False):
        index = index.to(device)
        with autocast(device, config.amp):
            logits = model(_inputs(images[index], config.dataset, config.channels_last))
        loss_sum += F.cross_entropy(logits.float(), labels[index], reduction="sum")
        correct += (logits.argmax(1) == labels[index]).sum()
    return {"loss": loss_sum.item() / len(labels), "acc": correct.item() / len(labels)}
