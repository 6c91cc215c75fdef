"""Data parallelism on `torch.distributed`: N processes (ranks) train one model, with the book's semantics.

Shape legend: B = batch_size (the global minibatch), N = world size, S = state rows, H = num_hiddens.

Launched by `torchrun` (which sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and
MASTER_PORT): gloo on the CPU, NCCL on CUDA. Every rank builds the same run from the same seed, so every rank
draws the same sampler offset and shuffle, and the same dropout masks for all B rows of a minibatch; rank r
trains rows [r B/N, (r + 1) B/N) of it, with those rows of the masks and its own rows of the carried state.
Each rank's loss and gradients are means over its B/N rows, so their mean over the ranks (one all-reduce of
one flat buffer) is the mean over all B rows: the single-process gradient, up to the order of a sum. Clipping
and the update come after it and are the same on every rank, so the weights stay identical everywhere.

Only rank 0 writes the run directory, prints and draws samples; every rank scores the held-out split (the
same weights give the same figure, so early stopping and rollbacks agree without a message). A checkpoint
holds the carried state of all B rows (gathered from the ranks), so a run resumes at any world size that
divides B. Setup failures on any rank reach every rank (`World.agree`), so none waits for one that is gone;
a collective that waits longer than TIMEOUT fails instead of hanging.
"""
from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass

import numpy as np

from .errors import RnnlabError

class Agreed(RnnlabError):
    """An error every rank raises together (a setup failure on any rank, settings that differ): rank 0 says it
    once."""


TIMEOUT = datetime.timedelta(minutes=10)     # a collective that waits this long fails rather than hangs
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class World:
    """This process's place among the ranks; `World()` is one process alone, and every collective is then
    the identity."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this rank writes, prints and samples (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def rows(self, batch_size: int) -> slice:
        """This rank's rows of a B-row minibatch (B divisible by N)."""
        share = batch_size // self.size
        return slice(self.rank * share, (self.rank + 1) * share)

    # --- collectives (the identity alone) -------------------------------------------------------------------

    def mean(self, loss: float, grads: dict) -> tuple[float, dict]:
        """The mean over the ranks of each rank's loss and gradients (numpy arrays or torch tensors, given back
        as the same kind), by one all-reduce of one flat buffer."""
        if not self.distributed:
            return loss, grads
        import torch
        import torch.distributed as dist
        names = list(grads)
        tensors = [torch.from_numpy(np.ascontiguousarray(g)) if isinstance(g, np.ndarray) else g
                   for g in grads.values()]
        flat = torch.cat([t.reshape(-1) for t in tensors] + [tensors[0].new_tensor([loss])])
        dist.all_reduce(flat)
        flat /= self.size
        out, at = {}, 0
        for name, g, t in zip(names, grads.values(), tensors):
            part = flat[at: at + t.numel()].view(t.shape)
            out[name] = part.numpy() if isinstance(g, np.ndarray) else part
            at += t.numel()
        return float(flat[-1]), out

    def gather_state(self, state):
        """The (S, B, H) carried state of all B rows from each rank's (S, B/N, H) rows, as numpy, on every
        rank; alone, the state as it is."""
        if not self.distributed or state is None:
            return state
        import torch
        import torch.distributed as dist
        local = state if isinstance(state, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(state))
        parts = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts, dim=1).cpu().numpy()

    def any(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag, true when it is true on any rank (a decision every rank must take at the same step: a
        time budget that ran out, Ctrl-C)."""
        if not self.distributed:
            return flags
        import torch
        import torch.distributed as dist
        t = torch.tensor([int(f) for f in flags], dtype=torch.int32)         # a CPU tensor: through gloo
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return tuple(bool(v) for v in t.tolist())

    def agree(self, error: str | None) -> None:
        """Every rank reports how its setup went; if any failed, every rank raises the first failure (rank 0's
        own line, or 'rank r: ...'), so no rank goes on to wait for one that stopped."""
        if not self.distributed:
            if error is not None:
                raise Agreed(error)
            return
        import torch.distributed as dist
        errors: list = [None] * self.size
        dist.all_gather_object(errors, error)
        for rank, e in enumerate(errors):
            if e is not None:
                raise Agreed(e if rank == 0 else f"rank {rank}: {e}")

    def same(self, what: dict) -> None:
        """Raise on every rank when the ranks' `what` (settings, the corpus's hash, where a resumed run stands)
        differ, naming the keys that differ."""
        if not self.distributed:
            return
        import torch.distributed as dist
        mine = json.loads(json.dumps(what, default=str))
        every: list = [None] * self.size
        dist.all_gather_object(every, mine)
        for rank, theirs in enumerate(every):
            differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            if differ:
                raise Agreed(f"the ranks' settings differ: rank {rank} has another "
                                  f"{', '.join(differ)} than rank {self.rank}; every rank must be given the "
                                  "same flags and see the same files")


ALONE = World()


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher) as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def init() -> World:
    """Join the process group torchrun set up. Where CUDA is present each rank takes the GPU of its LOCAL_RANK
    and the group is gloo for CPU tensors and NCCL for CUDA ones (a collective goes by its tensor's device, so
    a CPU run, the numpy reference and the small control messages use gloo); elsewhere gloo alone. Alone (no
    WORLD_SIZE above 1), the world of one process."""
    if not launched():
        return ALONE
    missing = [v for v in LAUNCH_VARS if v not in os.environ]
    if missing:
        raise RnnlabError(f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but {', '.join(missing)} is not set: start "
                          "the ranks with torchrun (torchrun --nproc-per-node N -m rnnlab train ...)")
    try:
        import torch
        import torch.distributed as dist
    except ImportError:
        raise RnnlabError("training on several processes needs torch: pip install 'rnnlab[torch]'") from None
    rank, size, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())     # `--device cuda` is this GPU
        backend = "cpu:gloo,cuda:nccl"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=TIMEOUT)
    return World(rank, size, local_rank)


def collectives(device: str) -> str:
    """What carries the gradients of a run on `device`: NCCL on CUDA, gloo on the CPU."""
    return "nccl" if device.startswith("cuda") else "gloo"


def shutdown(world: World) -> None:
    """Leave the process group (at the end of a run, whatever its outcome)."""
    if world.distributed:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


def check(world: World, batch_size: int, backend: str) -> None:
    """One clear line for a run the ranks cannot share: a batch the world size does not divide, or JAX
    (`backend`: the name of the path that trains)."""
    if not world.distributed:
        return
    if batch_size % world.size:
        raise RnnlabError(f"--batch-size {batch_size} does not divide among {world.size} ranks: give a multiple "
                          f"of {world.size} (each rank trains batch_size / {world.size} rows of every minibatch)")
    if backend.startswith("jax"):
        raise RnnlabError("torchrun trains with --backend torch or numpy; the JAX port runs in one process")
