"""Training on several processes: torchrun's launch, DistributedDataParallel, SyncBatchNorm.

fastnl launches nothing itself. `torchrun` (torch.distributed.run) starts one process
per device and sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT;
`Ranks.from_environment` reads them and `Ranks.start` joins the process group (NCCL
for CUDA devices, gloo for the CPU). A plain `python -m fastnl.train` sees none of
them and runs as a world of one, with no process group and no DDP wrapper.

torch's own `SyncBatchNorm` refuses CPU tensors (its statistics kernels are GPU-only);
`CPUSyncBatchNorm` computes the same statistics with all-reduces, so `--sync-bn`
means the same thing under gloo as under NCCL.
"""
import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_functional
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

# torchrun sets all of these in every process it starts
_LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in the job: its rank among `world_size` processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launched: bool = False  # started by torchrun (a process group is, or will be, joined)

    @classmethod
    def from_environment(cls, environ=None):
        environ = os.environ if environ is None else environ
        present = [name for name in _LAUNCH_VARIABLES if name in environ]
        if not present:
            return cls()
        if len(present) != len(_LAUNCH_VARIABLES):
            missing = sorted(set(_LAUNCH_VARIABLES) - set(present))
            raise RuntimeError(f"a torchrun launch sets {', '.join(_LAUNCH_VARIABLES)}; {', '.join(missing)} "
                               f"missing from the environment. Launch with torchrun, or unset {', '.join(present)}")
        return cls(int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ["LOCAL_RANK"]), True)

    @property
    def is_main(self):
        """Rank 0: the one process that writes files, logs and the progress bar."""
        return self.rank == 0

    def device(self, requested):
        """The device this rank trains on: `requested` (None: CUDA if available), one GPU per local rank."""
        device = torch.device(requested if requested is not None else "cuda" if torch.cuda.is_available() else "cpu")
        if not self.launched or device.type != "cuda":
            return device
        if device.index is not None:
            raise ValueError(f"--device {requested}: under torchrun each rank takes the GPU of its LOCAL_RANK; "
                             f"pass --device cuda (and CUDA_VISIBLE_DEVICES to choose GPUs)")
        if self.local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"rank {self.rank} has LOCAL_RANK {self.local_rank} but this machine shows "
                               f"{torch.cuda.device_count()} GPU(s); lower --nproc_per_node")
        return torch.device("cuda", self.local_rank)

    def start(self, device):
        """Join the process group of a torchrun launch: NCCL on CUDA, gloo otherwise."""
        if not self.launched or dist.is_initialized():
            return
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)

    def stop(self):
        if self.launched and dist.is_initialized():
            dist.destroy_process_group()

    def sum(self, values):
        """`values` (a tensor) summed over all ranks; the tensor itself in a world of one."""
        if self.launched:
            values = values.clone()
            dist.all_reduce(values)
        return values

    @contextlib.contextmanager
    def main_first(self):
        """Run the body on rank 0 first, then on the others (e.g. to decode and cache data once)."""
        if self.launched and not self.is_main:
            dist.barrier()
        yield
        if self.launched and self.is_main:
            dist.barrier()

    def broadcast_buffers(self, model):
        """Copy rank 0's buffers (BatchNorm running statistics) to every rank."""
        if self.launched:
            for buffer in model.buffers():
                dist.broadcast(buffer, 0)

    def wrap(self, model, device):
        """DistributedDataParallel around `model` under torchrun, else `model` itself."""
        if not self.launched:
            return model
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


class CPUSyncBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics span every rank's batch, for CPU tensors (gloo).

    torch.nn.SyncBatchNorm is GPU-only (its statistics kernels are CUDA, and DDP refuses
    it in a CPU module). Here the batch mean and (biased) variance come from two
    differentiable all-reduces (sums, then squared deviations: the two-pass form, no
    cancellation), whose backward all-reduces the gradients as torch's does; the running
    variance gets the unbiased estimate, as BatchNorm's does. Outside training, or in a
    world of one, it is plain BatchNorm. Parameters, buffers and state_dict keys are
    BatchNorm's.
    """

    process_group = None

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input):
        group = self.process_group or dist.group.WORLD
        if not self.training or not dist.is_initialized() or dist.get_world_size(group) == 1:
            return super().forward(input)
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / self.num_batches_tracked.item()
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        local = input.new_full((1,), input.numel() // input.shape[1])
        sums = dist_functional.all_reduce(torch.cat([input.sum(dims), local]), group=group)
        count = sums[-1]
        mean = sums[:-1] / count
        centered = input - mean.view(shape)
        variance = dist_functional.all_reduce(centered.square().sum(dims), group=group) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.running_mean.lerp_(mean, factor)
                self.running_var.lerp_(variance * count / (count - 1).clamp(min=1), factor)
        out = centered * torch.rsqrt(variance + self.eps).view(shape)
        return out * self.weight.view(shape) + self.bias.view(shape) if self.affine else out


def convert_sync_batchnorm(model, device):
    """Every BatchNorm*d in `model` (the nonlocal blocks' W_z BatchNorm included) synchronised over ranks.

    torch's converter does the walk and keeps parameters and buffers (state_dict keys do
    not change, so checkpoints load either way); on CPU the converted modules then take
    the class CPUSyncBatchNorm, which holds the same attributes.
    """
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if device.type == "cpu":
        for module in model.modules():
            if type(module) is torch.nn.SyncBatchNorm:
                module.__class__ = CPUSyncBatchNorm
    return model
