"""Scale-out with torch.distributed: every rank plans from headers, writes its own shards.

Launched by `torchrun` / `accelerate launch` (WORLD_SIZE > 1 in the environment). Shards are
assigned to ranks deterministically, balanced by bytes; a rank reads only the inputs its shards
need. Only small objects cross ranks (the temp folder name, stats, hashes, success flags), over
gloo even when the tensors live on NCCL devices. Rank 0 writes the index, weightx.json and the
card and renames the folder into place; if any rank fails, every rank fails and nothing is left.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch

from weightx.errors import RankFailed, WeightxError

T = TypeVar("T")


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    active: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast(self, value: T) -> T:
        """Rank 0's value, on every rank."""
        if not self.active:
            return value
        import torch.distributed as dist

        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: T) -> list[T]:
        """Every rank's value, in rank order, on rank 0 (others get [])."""
        if not self.active:
            return [value]
        import torch.distributed as dist

        out: list = [None] * self.world if self.is_main else None  # type: ignore[assignment]
        dist.gather_object(value, out, dst=0)
        return out if self.is_main else []

    def all_ok(self, ok: bool) -> bool:
        """True only if every rank says ok."""
        if not self.active:
            return ok
        import torch.distributed as dist

        flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run fn on rank 0 and share its result; if it fails there, every rank raises."""
        result: tuple[bool, Any] = (True, None)
        if self.is_main:
            try:
                result = (True, fn())
            except WeightxError as e:
                if not self.active:
                    raise
                result = (False, e)
        shared = self.broadcast(result)
        if not shared[0]:
            if self.is_main:
                raise shared[1]
            raise RankFailed(f"rank 0 failed: {shared[1]}")
        return shared[1]

    def close(self) -> None:
        if self.active:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.active = False


def detect() -> Dist:
    """Join the process group torchrun/accelerate set up, or run as a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        timeout = _dt.timedelta(seconds=float(os.environ.get("WEIGHTX_DIST_TIMEOUT", "1800")))
        dist.init_process_group(backend=backend, timeout=timeout)
    # Share the cores between the ranks of this node instead of oversubscribing them.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return Dist(rank, world, int(os.environ.get("LOCAL_RANK", "0")), local_world, active=True)


def assign(sizes: list[int], world: int) -> list[list[int]]:
    """Shard indices per rank: largest first onto the least-loaded rank (ties: lowest rank)."""
    loads = [0] * world
    out: list[list[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (loads[r], r))
        out[r].append(i)
        loads[r] += sizes[i]
    return [sorted(x) for x in out]
