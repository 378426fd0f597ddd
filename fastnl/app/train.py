"""`python -m fastnl.train`: train a CIFAR (Pre)ResNet with nonlocal blocks.

    python -m fastnl.train --data-dir DATA --preset proposed-3 --out runs/proposed-3
    python -m fastnl.train --data-dir DATA --placement "original:2@2.2" --epochs 10 --out runs/x
    python -m fastnl.train --out runs/proposed-3 --resume
    torchrun --standalone --nproc_per_node=4 -m fastnl.train --data-dir DATA --preset proposed-3 --sync-bn

The command line only fills a TrainConfig; `fastnl.app.engine.train` does the work.
"""
import argparse
import sys
from pathlib import Path

from fastnl.app.checkpoint import CHECKPOINT, load_checkpoint
from fastnl.app.config import TrainConfig
from fastnl.app.data import NUM_CLASSES
from fastnl.app.loops import NonFiniteLoss
from fastnl.models import ARCHS, PRESETS
from fastnl.modules import MODES

EXIT_NON_FINITE = 3


def _ints(text):
    return tuple(int(part) for part in text.split(",") if part)


def parser():
    """The argument parser; its defaults are TrainConfig's (He et al.'s PreResNet recipe)."""
    default = TrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m fastnl.train", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Recipe (defaults): SGD lr 0.1, momentum 0.9, weight decay 1e-4, batch 128, 164 epochs, "
               "lr divided by 10 after epochs 81 and 122 (He et al., PreResNet on CIFAR). "
               "Placement specs: KIND[:COUNT]@STAGE.BLOCK[,...], e.g. proposed:3@2.2 "
               "(see fastnl/models/placement.py and docs/training.md).")
    p.add_argument("--dataset", choices=sorted(NUM_CLASSES), default=default.dataset)
    p.add_argument("--data-dir", default=default.data_dir,
                   help="holds cifar-10-batches-py/ (or cifar-100-python/), downloaded if missing, "
                        "or an ImageFolder tree train/<class>/, test/<class>/")
    p.add_argument("--cache-dir", default=None,
                   help="where decoded ImageFolder tensors are cached; None: $FASTNL_CACHE_DIR "
                        "or ~/.cache/fastnl")
    p.add_argument("--arch", choices=sorted(ARCHS), default=default.arch)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--preset", choices=list(PRESETS), help="a Table 1 row; None (and no --placement): baseline")
    where.add_argument("--placement", help="a placement spec, e.g. 'proposed:3@2.2'")
    p.add_argument("--mode", choices=sorted(MODES), default=default.mode, help="nonlocal affinity kernel")
    p.add_argument("--backend", default=None,
                   help="nonlocal op backend (fastnl.backends names); None: the device's fastest")
    p.add_argument("--out", default=default.out, help="directory for config.json, logs, checkpoint")
    p.add_argument("--epochs", type=int, default=default.epochs)
    p.add_argument("--lr", type=float, default=default.lr)
    p.add_argument("--momentum", type=float, default=default.momentum)
    p.add_argument("--weight-decay", type=float, default=default.weight_decay)
    p.add_argument("--batch-size", type=int, default=default.batch_size,
                   help="the global batch: under torchrun each of K ranks takes batch-size / K, so lr "
                        "stays as it is; if you scale the global batch by k, scale --lr by k (Goyal et al.)")
    p.add_argument("--milestones", type=_ints, default=None,
                   help="comma-separated epochs after which lr is multiplied by --gamma; None: the recipe's "
                        "81,122 of 164 epochs at the same fractions of --epochs (81,122 for 164, 10,15 for 20)")
    p.add_argument("--gamma", type=float, default=default.gamma)
    p.add_argument("--seed", type=int, default=default.seed)
    p.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1; None: cuda if available")
    p.add_argument("--amp", choices=["bf16", "fp16"], default=None,
                   help="autocast dtype; bf16 is the fast mode on GPUs and on CPUs with AMX or a full-rate "
                        "AVX512-BF16 such as a Zen 4 (on a Sapphire Rapids with AMX off, oneDNN's bf16 "
                        "convolutions were slower than float32 ones)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last memory format for model and inputs; None: on for CPU runs (faster there, "
                        "the same float32 numerics), off elsewhere")
    p.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=None,
                   help="raise glibc malloc's mmap and trim thresholds, so freed tensors are reused and not "
                        "faulted in again each step (fastnl/app/malloc.py); None: on for CPU runs")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--sync-bn", action="store_true",
                   help="under torchrun: BatchNorm statistics over the global batch (SyncBatchNorm, the "
                        "nonlocal blocks' too), not each rank's shard")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--train-subset", type=int, default=None,
                   help="train on N images (a seeded random subset) for quick runs")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out with the settings stored in its checkpoint; options given "
                        "beside it override them unless they change what is computed")
    return p


def config_from_args(args):
    values = dict(vars(args))
    preset, spec = values.pop("preset"), values.pop("placement")
    return TrainConfig(placement=preset or spec or "baseline", **values)


def _given_options(argv):
    """The destinations of the options written on this command line (not defaults)."""
    quiet = parser()
    for action in quiet._actions:  # argparse's own way to leave an absent option unset
        action.default = argparse.SUPPRESS
    return set(vars(quiet.parse_args(argv)))


def config_for(argv=None):
    """The run's TrainConfig. With --resume, the settings stored in the checkpoint in
    --out, so a resumed run needs no flags retyped, with the options written on this
    command line on top; the engine then refuses those that change what is computed."""
    args = parser().parse_args(argv)
    config = config_from_args(args)
    checkpoint_path = Path(args.out) / CHECKPOINT
    if not args.resume or not checkpoint_path.exists():
        return config  # without a checkpoint the engine says so
    resumed = TrainConfig.from_dict(load_checkpoint(checkpoint_path)["config"])
    for name in _given_options(sys.argv[1:] if argv is None else argv) | {"out", "resume"}:
        field = "placement" if name in ("preset", "placement") else name
        setattr(resumed, field, getattr(config, field))
    return resumed


def main(argv=None):
    config = config_for(argv)
    from fastnl.app.distributed import Ranks  # after parsing, so --help stays fast
    from fastnl.app.engine import train

    ranks = Ranks.from_environment()
    try:
        final = train(config)
    except NonFiniteLoss as error:
        if ranks.is_main:  # every rank stops at the same step; one message is enough
            print(f"fastnl.train: stopped: {error}. Lower --lr or check the data; the last good "
                  f"checkpoint (if any) is kept.", file=sys.stderr)
        return EXIT_NON_FINITE
    except Exception as error:
        if ranks.launched:  # torchrun then stops the other ranks; say which one failed and why
            print(f"fastnl.train: rank {ranks.rank} of {ranks.world_size} failed "
                  f"({type(error).__name__}: {error}); stopping the job", file=sys.stderr)
        raise
    if ranks.is_main and "test_acc" in final:
        print(f"final epoch {final['epoch']}: test accuracy {final['test_acc']:.4f} "
              f"(error {final['test_error']:.2f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
