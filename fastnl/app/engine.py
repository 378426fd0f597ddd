"""`train(config)`: the whole training run, from data to final test accuracy.

One function for the command line, `fastnl.reproduce` and torchrun: launched by
torchrun, every rank runs it under DistributedDataParallel (fastnl.app.distributed) on
its shard of each global batch (fastnl.app.data.epoch_batches, shard). Everything random
comes from `config.seed`: torch's global generator (initialisation) and one data
generator (shuffling, augmentation), drawn identically on every rank and saved in
every checkpoint, which makes a resumed CPU run bit-identical to an uninterrupted one
and lets a checkpoint written by K ranks resume on any number of ranks.
"""
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from fastnl import NonlocalBlock, NonlocalStage, backends
from fastnl.app.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from fastnl.app.config import TrainConfig, resume_mismatches, scaled_milestones
from fastnl.app.curves import plot_run
from fastnl.app.data import load_dataset
from fastnl.app.distributed import Ranks, convert_sync_batchnorm
from fastnl.app.loops import evaluate, train_one_epoch
from fastnl.app.malloc import keep_freed_memory
from fastnl.app.runlog import code_version, epoch_line, write_json, write_logs
from fastnl.models import build_model


def _nonlocal_backend(model, config, device):
    """The op backend the nonlocal modules run (None when the model has none)."""
    if not any(isinstance(module, (NonlocalBlock, NonlocalStage)) for module in model.modules()):
        return None
    return config.backend if config.backend == "reference" else backends.resolve(config.backend, device.type)


def _data(config, device, ranks):
    with ranks.main_first():  # rank 0 decodes (and caches) an ImageFolder tree, the others read the cache
        train_images, train_labels = load_dataset(config.dataset, config.data_dir, True, config.cache_dir)
        test_images, test_labels = load_dataset(config.dataset, config.data_dir, False, config.cache_dir)
    if config.train_subset is not None:
        # a seeded permutation: ImageFolder trees are sorted by class
        keep = torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(config.seed))
        keep = keep[:config.train_subset]
        train_images, train_labels = train_images[keep], train_labels[keep]
    return [tensor.to(device) for tensor in (train_images, train_labels, test_images, test_labels)]


def _rng_state(generator, device):
    state = {"torch": torch.get_rng_state(), "data": generator.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state, generator, device):
    torch.set_rng_state(state["torch"])
    generator.set_state(state["data"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _forwards(model, config, ranks, device):
    """(training forward, evaluation forward): DDP (under torchrun) wraps only the training
    one, so evaluation runs the plain module with no per-batch collectives."""
    compiled = torch.compile if config.compile else (lambda module: module)
    evaluation = compiled(model)
    return (compiled(ranks.wrap(model, device)) if ranks.launched else evaluation), evaluation


def train(config):
    """Train per `config` (a TrainConfig); -> dict with the final epoch's row and run facts.

    Writes config.json, log.csv, log.json, checkpoint.pt (every epoch) and final.json
    to config.out (rank 0 only, under torchrun). Raises fastnl.app.loops.NonFiniteLoss if
    the loss becomes NaN/inf (on every rank at the same step).
    """
    ranks = Ranks.from_environment()
    device = ranks.device(config.device)
    if config.batch_size % ranks.world_size:
        raise ValueError(f"--batch-size {config.batch_size} is the global batch and must be divisible by the "
                         f"{ranks.world_size} ranks (each takes batch_size / world_size)")
    ranks.start(device)
    try:
        return _train(config, ranks, device)
    finally:
        ranks.stop()


def _resolved(config, saved, device):
    """config with the defaults decided when a run starts filled in: the resumed
    checkpoint's choices, else the recipe's milestones scaled to --epochs and the
    channels-last layout and kept freed memory on CPU. Stored so in config.json and the
    checkpoint."""
    if config.milestones is None:
        stored = saved.milestones if saved else None
        config = replace(config, milestones=stored if stored is not None else scaled_milestones(config.epochs))
    if config.channels_last is None:
        config = replace(config, channels_last=saved.channels_last if saved else device.type == "cpu")
    if config.keep_freed_memory is None:
        stored = saved.keep_freed_memory if saved else None
        config = replace(config, keep_freed_memory=stored if stored is not None else device.type == "cpu")
    return config


def _train(config, ranks, device):
    out = Path(config.out)
    checkpoint_path = out / CHECKPOINT
    if checkpoint_path.exists() and not config.resume:
        raise FileExistsError(f"{out} already holds a run ({CHECKPOINT}); pass --resume to continue it "
                              f"or choose another --out")
    if config.resume and not checkpoint_path.exists():
        raise FileNotFoundError(f"--resume: no {CHECKPOINT} in {out}")
    state = load_checkpoint(checkpoint_path, map_location=device) if config.resume else None
    saved = TrainConfig.from_dict(state["config"]) if state else None
    config = _resolved(config, saved, device)
    if saved:
        mismatches = resume_mismatches(saved, config)
        if mismatches:
            flags = ["--preset/--placement" if name == "placement" else f"--{name.replace('_', '-')}"
                     for name in mismatches]
            raise ValueError(f"--resume: {', '.join(flags)} differ from the checkpoint's settings; drop them "
                             f"to continue the run as it was, or start a new --out")
    malloc = keep_freed_memory() if config.keep_freed_memory else "unchanged"
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model = build_model(**config.model_kwargs())
    if config.sync_bn:
        model = convert_sync_batchnorm(model, device)
    model = model.to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(config.milestones), config.gamma)
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    epoch, step, history = 0, 0, []
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"], generator, device)
        epoch, step, history = state["epoch"], state["step"], state["history"]
    train_images, train_labels, test_images, test_labels = _data(config, device, ranks)
    nonlocal_backend = _nonlocal_backend(model, config, device)
    # under --amp bf16, how the backend computes bf16 where it chooses (cpp: native or
    # converted to float32), which decides its numerics
    bfloat16_path = backends.bfloat16_path(nonlocal_backend) if config.amp == "bf16" else None
    facts = {"device": str(device), "nonlocal_backend": nonlocal_backend, "bfloat16_path": bfloat16_path,
             "parameters": sum(p.numel() for p in model.parameters()), "torch": torch.__version__,
             "train_images": len(train_labels), "test_images": len(test_labels), "world_size": ranks.world_size,
             "code_version": code_version(), "malloc": malloc}
    if ranks.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", {**config.to_dict(), "run": facts})
        print(f"{config.arch} {config.placement!r}: {facts['parameters']:,} parameters on {device} "
              f"x {ranks.world_size} rank(s), nonlocal backend {facts['nonlocal_backend']}", file=sys.stderr)
    stepped, evaluated = _forwards(model, config, ranks, device)
    while epoch < config.epochs and (config.max_steps is None or step < config.max_steps):
        start = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        budget = None if config.max_steps is None else config.max_steps - step
        trained = train_one_epoch(stepped, optimizer, scaler, train_images, train_labels, generator, config,
                                  device, budget, f"epoch {epoch + 1}/{config.epochs}", ranks)
        ranks.broadcast_buffers(model)  # every rank evaluates (and rank 0 saves) the same model
        tested = evaluate(evaluated, test_images, test_labels, config, device, ranks)
        scheduler.step()
        epoch, step = epoch + 1, step + trained["steps"]
        history.append({
            "epoch": epoch, "lr": lr, "train_loss": trained["loss"], "train_acc": trained["acc"],
            "test_loss": tested["loss"], "test_acc": tested["acc"],
            "epoch_time_s": time.perf_counter() - start, "train_time_s": trained["seconds"],
            "images_per_s": trained["images"] / trained["seconds"], "steps": trained["steps"],
        })
        if ranks.is_main:
            save_checkpoint(checkpoint_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "rng": _rng_state(generator, device), "epoch": epoch, "step": step, "history": history,
                "config": config.to_dict(),
            })
            write_logs(out, history)
            plot_run(history, out / "curves.png", f"{config.arch} {config.placement}, seed {config.seed}")
            print(epoch_line(history[-1]), file=sys.stderr)
    final = {**history[-1], "test_error": 100 * (1 - history[-1]["test_acc"]), **facts} if history else facts
    if ranks.is_main:
        write_json(out / "final.json", final)
    return final
