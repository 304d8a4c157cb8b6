"""Data-parallel training across processes launched by ``torchrun`` (one process per rank).

``torchrun`` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; :func:`init` reads them
and joins the process group (gloo on CPU, nccl when CUDA is available). Without them, or with
WORLD_SIZE=1, everything here is a no-op and the code runs as a single process.

How the training steps stay equal to a single process on the same global batch:

- data: ``grade.data.dataset.iter_batches(rank=r, world_size=w)`` deals each epoch's order round robin,
  so with a per-rank batch of B/w the ranks' i-th batches together are the single process's i-th
  batch of B requests (rank r holds global rows r, r+w, r+2w, ...);
- gradients: :class:`GradientAverager` averages them over ranks in one collective; a loss that is a
  mean over equal-sized rank batches then has the global batch's gradient;
- samples: :func:`gather_rows` rebuilds a global tensor in the single process's row order, so every
  rank can draw the whole global batch's samples from the shared seed and keep its own rows
  (:func:`local_rows`);
- writes: only rank 0 writes checkpoints and outputs (:func:`is_main`, :func:`main_first`).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Context:
    """Where this process stands in the job."""

    rank: int = 0
    """global rank, 0 .. world_size-1"""
    world_size: int = 1
    """number of processes in the job"""
    local_rank: int = 0
    """rank on this node (picks the GPU when there are several)"""
    backend: str | None = None
    """the process group's backend (gloo, nccl), None without a process group"""

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env(env: Mapping[str, str] | None = None) -> Context:
    """The rank layout that ``torchrun`` announces in the environment (a single process without it)."""
    env = os.environ if env is None else env

    def number(name: str, default: int) -> int:
        text = env.get(name, "")
        if not text:
            return default
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"environment variable {name}={text!r}: expected an integer") from None

    world = number("WORLD_SIZE", 1)
    rank = number("RANK", 0)
    local = number("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank}, WORLD_SIZE={world}: expected 0 <= RANK < WORLD_SIZE")
    return Context(rank=rank, world_size=world, local_rank=local)


def default_backend() -> str:
    """nccl when CUDA is there, gloo otherwise (gloo is the CPU backend)."""
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def init(backend: str | None = None, timeout_s: float = 1800.0) -> Context:
    """Join the process group announced by ``torchrun`` (no-op for a single process).

    The timeout bounds how long a rank waits in a collective for the others (a crashed peer).
    """
    ctx = from_env()
    if not ctx.distributed:
        return ctx
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = backend or default_backend()
    if not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(ctx.local_rank)
        dist.init_process_group(backend=backend, rank=ctx.rank, world_size=ctx.world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    log.info("distributed: rank %d of %d (local rank %d), backend %s, master %s:%s", ctx.rank, ctx.world_size,
             ctx.local_rank, backend, os.environ.get("MASTER_ADDR", "?"), os.environ.get("MASTER_PORT", "?"))
    if ctx.rank != 0:  # the other ranks repeat rank 0's progress lines: keep only their warnings
        grade_log = logging.getLogger("grade")
        grade_log.setLevel(max(grade_log.getEffectiveLevel(), logging.WARNING))
    return dataclasses.replace(ctx, backend=backend)


def teardown() -> None:
    """Leave the process group (after a last barrier, so no rank exits while another still talks)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@contextmanager
def session(backend: str | None = None) -> Iterator[Context]:
    """``with session() as ctx:`` joins the group on entry and leaves it on a normal exit.

    On an exception the group is destroyed without a barrier (the peers fail on their next collective
    or time out; torchrun then stops the job).
    """
    ctx = init(backend)
    try:
        yield ctx
    except BaseException:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        raise
    teardown()


def active() -> bool:
    """True inside a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """True on rank 0, the rank that writes (and in a single process)."""
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over ranks (a new tensor; the input itself in one process)."""
    if not active():
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape on every rank), in rank order."""
    if not active():
        return [tensor]
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.detach().contiguous())
    return parts


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """The global batch's rows of a per-rank tensor [b, ...], in the single process's order [w*b, ...].

    Rank r holds global rows r, r+w, r+2w, ... (the round-robin deal of ``iter_batches``), so the
    gathered pieces are interleaved; every rank's batch must have the same size.
    """
    parts = all_gather(tensor)
    if len(parts) == 1:
        return tensor
    return torch.stack(parts, dim=1).reshape(-1, *tensor.shape[1:])


def local_rows(n_global: int, rank_: int | None = None, world: int | None = None) -> torch.Tensor:
    """Indices of this rank's rows within a global batch of ``n_global`` rows (see :func:`gather_rows`)."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    return torch.arange(r, n_global, w)


class GradientAverager:
    """``averager(model)`` after ``backward()``: every rank's gradients become their mean over ranks.

    All gradients travel in one flat buffer (one collective per step instead of one per tensor).
    A parameter without a gradient on this rank counts as a zero gradient, so ranks never disagree
    on the buffer's layout. Call it on every rank at every step, also when a rank's batch is empty.
    """

    def __init__(self, world: int | None = None):
        self.world_size = world_size() if world is None else world

    def __call__(self, model: nn.Module) -> None:
        if self.world_size <= 1 or not active():
            return
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world_size
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (losses use it to normalise by global counts)."""
        return all_sum(tensor)
