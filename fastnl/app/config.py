"""The training configuration: one dataclass, its defaults and what must match on resume.

Defaults are He et al.'s PreResNet recipe for CIFAR (Identity Mappings in Deep Residual
Networks, 2016): SGD, lr 0.1, momentum 0.9, weight decay 1e-4, batch 128, 164
epochs, lr divided by 10 after epochs 81 and 122 (bearpaw/pytorch-classification's
`--schedule 81 122`).

`epochs` other than 164 (a reduced schedule) keeps the recipe's shape: unless
`milestones` are given, the lr drops after the same fractions of the run, 81/164 and
122/164 of `epochs` (rounded), decided when the run starts and stored with it, so a
resumed run, a longer `--epochs` included, keeps them.

`batch_size` is the global batch: under torchrun each of the K ranks takes
batch_size / K of it, so the recipe (and lr) does not change with the number of ranks.
"""
from dataclasses import asdict, dataclass, fields

from fastnl.app.data import NUM_CLASSES


@dataclass
class TrainConfig:
    dataset: str = "cifar10"
    data_dir: str = "data"
    arch: str = "preresnet20"
    placement: str = "baseline"
    mode: str = "embedded_gaussian"
    backend: str | None = None
    out: str = "runs/default"
    epochs: int = 164
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 128
    milestones: tuple | None = None  # None: scaled_milestones(epochs) when the run starts
    gamma: float = 0.1
    seed: int = 0
    device: str | None = None
    amp: str | None = None
    channels_last: bool | None = None  # None: resolved when a run starts (True on CPU)
    keep_freed_memory: bool | None = None  # None: resolved when a run starts (True on CPU); fastnl.app.malloc
    compile: bool = False
    sync_bn: bool = False
    max_steps: int | None = None
    train_subset: int | None = None
    cache_dir: str | None = None
    resume: bool = False

    def model_kwargs(self):
        """The keyword arguments of fastnl.models.build_model for this run."""
        return {"arch": self.arch, "placement": self.placement, "num_classes": NUM_CLASSES[self.dataset],
                "mode": self.mode, "backend": self.backend}

    def to_dict(self):
        state = asdict(self)
        state["milestones"] = None if self.milestones is None else list(self.milestones)
        state["model"] = self.model_kwargs()
        return state

    @classmethod
    def from_dict(cls, state):
        names = {field.name for field in fields(cls)}
        config = cls(**{key: value for key, value in state.items() if key in names})
        config.milestones = None if config.milestones is None else tuple(config.milestones)
        return config


RECIPE_EPOCHS, RECIPE_MILESTONES = 164, (81, 122)


def scaled_milestones(epochs):
    """The recipe's lr milestones at the same fractions of an `epochs`-long run (distinct:
    a run too short for two drops gets one)."""
    return tuple(sorted({max(1, round(milestone * epochs / RECIPE_EPOCHS)) for milestone in RECIPE_MILESTONES}))


# settings that may change when a run is resumed: where and how long it runs, not what
# it computes
RESUMABLE_CHANGES = {"data_dir", "out", "epochs", "device", "max_steps", "cache_dir", "resume", "compile",
                     "backend", "channels_last", "keep_freed_memory", "sync_bn"}


def resume_mismatches(saved, current):
    """Names of fields whose values differ between a checkpoint's config and this run
    (the stored `model` arguments are derived from the fields, which are compared)."""
    saved, current = saved.to_dict(), current.to_dict()
    return sorted(key for key in current
                  if key not in RESUMABLE_CHANGES and key != "model" and saved.get(key) != current[key])
