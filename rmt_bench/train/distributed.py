"""Data parallel training across processes started by torchrun, on PyTorch's own `torch.distributed`.

One training, N processes: every rank builds the same model (same seed), reads the same global batch and keeps
its own rows of it (`shard`: a disjoint slice of the examples, or of the columns of a language-modelling stream,
whose carried memory / cache then belong to that rank). The loss of a step is normalised by the global count of
answer tokens (`sum`), and after the whole step's backward (every segment and BPTT window) the gradients are
summed across ranks (`all_reduce_grads`): the gradient is the one-process gradient of the global batch, so every
rank takes the same optimiser step and the parameters stay equal without being broadcast again.

Gradients are reduced once per step rather than by `DistributedDataParallel`'s hooks: a step calls backward
once per segment (BPTT-k) and the recurrent model runs outside its `forward`, which DDP's hooks would reduce
several times per step.

Rank 0 alone evaluates, checkpoints, logs and tests; decisions it takes (the step budget, early stop, a signal)
reach the other ranks by `broadcast`, so no rank waits on a collective the others never join.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist

# Other ranks wait in a collective while rank 0 validates and checkpoints, and at the end while it tests: the
# process group's timeout has to outlast the longest of these (a paper-scale WikiText-103 split, a greedy
# 10,000-example test: minutes to tens of minutes).
TIMEOUT = datetime.timedelta(hours=3)


@dataclass(frozen=True)
class Dist:
    """This process's place in the training: rank and world size (1: no process group, every call is local)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, batch):
        """This rank's rows of a global batch (B, S, n): B / world consecutive rows."""
        if self.world == 1:
            return batch
        rows = batch.inputs.shape[0] // self.world
        return batch.rows(self.rank * rows, (self.rank + 1) * rows)

    def sum(self, value: float) -> float:
        """The sum of `value` over the ranks (float64)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        tdist.all_reduce(t)
        return t.item()

    def all_reduce_grads(self, model: torch.nn.Module) -> None:
        """Sum the parameters' gradients over the ranks, in one flat buffer. A parameter without a gradient keeps
        none (every rank runs the same graph, so the same ones have none): the optimiser skips it, as one process
        does (the initial memory once the carried memory replaces it; a zero gradient would still move it by
        Adam's momentum)."""
        if self.world == 1:
            return
        params = [p for p in model.parameters() if p.grad is not None]
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        tdist.all_reduce(flat)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p))
            offset += n

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list | None:
        """Every rank's `obj`, as a list in rank order on rank 0 (None elsewhere)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.main else None
        tdist.gather_object(obj, out, dst=0)
        return out


SOLO = Dist()


def world_from_environment() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) for a plain process."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def start(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA, one GPU per local rank); a plain
    process gets `SOLO` and its device unchanged."""
    rank, world, local_rank = world_from_environment()
    if world == 1:
        return SOLO, device
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    return Dist(rank, world), device


def stop() -> None:
    """Leave the process group together: every rank waits for the others (rank 0 tests last) before it is
    destroyed; a rank that left alone while another still used the group can abort at exit (gloo's threads)."""
    if tdist.is_initialized():
        try:
            tdist.barrier()
        finally:
            tdist.destroy_process_group()
