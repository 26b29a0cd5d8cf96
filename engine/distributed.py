"""Data parallelism with torchrun: every process trains on its slice of the global batch."""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather_rows(self, rows: list) -> list:
        """All ranks' per-image rows in split order (rank r holds images r, r + world, ...)."""
        if not self.enabled:
            return rows
        parts = [None] * self.world_size
        dist.all_gather_object(parts, rows)
        return [part[k] for k in range(len(parts[0])) for part in parts if k < len(part)]


def init_distributed(device: torch.device) -> DistContext:
    """Join the process group that torchrun describes in the environment (nothing to do for one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistContext()
    ctx = DistContext(int(os.environ["RANK"]), world)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return ctx


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
