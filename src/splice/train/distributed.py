"""Several processes: this process's place in a torchrun job, and its share of every step's batch."""

from __future__ import annotations

import os

import torch
from torch import Tensor


def world_size() -> int:
    """The number of processes of this torchrun job (1 without one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


class Dist:
    """This process's place in a torchrun job (world 1 without one)."""

    def __init__(self, device: str | None):
        import torch.distributed as dist

        self.dist = dist
        self.world = world_size()
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device is None:
            device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.owned = False
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.owned = True
        self.on = self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, t: Tensor) -> Tensor:
        if self.on:
            t = t.to(self.device)
            self.dist.all_reduce(t)
        return t.cpu()

    def close(self) -> None:
        if self.owned and self.dist.is_initialized():
            self.dist.destroy_process_group()


class Micro(torch.utils.data.Dataset):
    """Micro-batch ``j`` of this process, from stream offset ``offset`` on: step ``j // accum``, part ``j % accum``."""

    def __init__(self, source, offset: int, global_batch: int, world: int, rank: int, accum: int):
        self.source, self.offset, self.g = source, offset, global_batch
        self.world, self.rank, self.accum = world, rank, accum
        self.mb = global_batch // (world * accum)

    def positions(self, j: int) -> range:
        step, part = divmod(j, self.accum)
        start = self.offset + step * self.g + (self.rank * self.accum + part) * self.mb
        return range(start, start + self.mb)

    def __len__(self) -> int:  # the DataLoader asks; the sampler is what bounds it
        return 1 << 62

    def __getitem__(self, j: int) -> dict:
        return self.source.get(self.positions(j))


class Count(torch.utils.data.Sampler):
    def __iter__(self):
        j = 0
        while True:
            yield j
            j += 1


def gather_with_grad(x: Tensor) -> Tensor:
    """Every process's rows of ``x`` (B_r, ...) concatenated in rank order, gradients included (open_clip's
    ``gather_with_grad``); ``x`` itself outside a multi-process run.

    The backward sums every process's gradient of the gathered tensor and hands each process its own rows. So a
    loss that every process computes on the whole gathered batch (a contrastive loss, whose negatives then grow
    with the world size), scaled as the trainer scales it, trains each process's rows as one process would train
    the global batch, once DistributedDataParallel averages the parameters' gradients."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        import torch.distributed as dist

        world = dist.get_world_size()
        count = torch.tensor([x.shape[0]], device=x.device)
        counts = [torch.zeros_like(count) for _ in range(world)]
        dist.all_gather(counts, count)  # the processes' row counts may differ (rows that failed to load)
        sizes = [int(c) for c in counts]
        padded = x.new_zeros((max(sizes), *x.shape[1:]))  # (max B_r, ...)
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        ctx.sizes, ctx.rank = sizes, dist.get_rank()
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])  # (sum B_r, ...)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # sum over processes: each computed the loss on the whole gathered batch
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]]
