"""Process topology: the only module that reads RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun and accelerate).

Data stages need no process group: each worker writes its own shards and whoever finds all shards present commits.
Workers are the ranks of one launch times the independent jobs of `--shard i/n`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from tmdcli.errors import UsageError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    """This process's place in a launch (single process when no launcher set the variables)."""
    rank = int(os.environ.get("RANK", os.environ.get("ACCELERATE_PROCESS_INDEX", 0)))
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("ACCELERATE_NUM_PROCESSES", 1)))
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("ACCELERATE_LOCAL_PROCESS_INDEX", 0)))
    if not 0 <= rank < world:
        raise UsageError(f"inconsistent launcher variables: RANK={rank} WORLD_SIZE={world}")
    return DistInfo(rank=rank, world_size=world, local_rank=local)


def fsdp_enabled() -> bool:
    """True under `accelerate launch` with an FSDP config (accelerate exports ACCELERATE_USE_FSDP to every rank), or
    when a dry run is told to plan for one (TMD_PLAN_FSDP=1, set by the recipes' DRY_RUN)."""
    return any(os.environ.get(k, "false").lower() in ("1", "true") for k in ("ACCELERATE_USE_FSDP", "TMD_PLAN_FSDP"))


def planned_world_size() -> int:
    """Processes a plan is made for: the launch's, or TMD_PLAN_WORLD_SIZE in a plain dry run of a multi-GPU recipe."""
    info = dist_info()
    if info.world_size == 1 and os.environ.get("TMD_PLAN_WORLD_SIZE"):
        try:
            return max(1, int(os.environ["TMD_PLAN_WORLD_SIZE"]))
        except ValueError:
            raise UsageError(f"TMD_PLAN_WORLD_SIZE must be an integer, got {os.environ['TMD_PLAN_WORLD_SIZE']!r}")
    return info.world_size


def parse_shard(text: str | None) -> tuple[int, int]:
    """`--shard i/n` (0 <= i < n) -> (i, n); None -> (0, 1)."""
    if text is None:
        return 0, 1
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise UsageError(f"--shard {text}: need 0 <= i < n")
    return i, n


def worker_slot(shard: str | None, info: DistInfo | None = None) -> tuple[int, int]:
    """(worker index, number of workers) over both `--shard i/n` jobs and the ranks inside each job."""
    i, n = parse_shard(shard)
    info = info or dist_info()
    return i * info.world_size + info.rank, n * info.world_size


def my_shards(num_shards: int, worker: int, num_workers: int) -> list[int]:
    """Shards this worker owns: shard k belongs to worker k % num_workers (the split never depends on speed)."""
    return [k for k in range(num_shards) if k % num_workers == worker]


def device_for(device: str, info: DistInfo | None = None) -> str:
    """`auto` -> this rank's GPU (cuda:LOCAL_RANK) when CUDA is present, else cpu."""
    if device != "auto":
        return device
    import torch

    info = info or dist_info()
    return f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu"


def make_accelerator(device: str):
    """The one Accelerator of a training run (process group, DDP/FSDP wrapping from `accelerate launch`'s config).

    Device placement and mixed precision stay with the training loop (explicit bf16 autocast on GPU, fp32 master
    weights), so the same code runs unchanged in a plain single process on the CPU.
    """
    import torch
    from accelerate import Accelerator

    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    return Accelerator(cpu=on_cpu, mixed_precision="no", device_placement=False)
