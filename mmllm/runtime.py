"""Where code runs: the device and, under `torchrun`, the process group (gloo on CPU, nccl on GPU)."""

from __future__ import annotations

import dataclasses
import os

import torch


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_name: str) -> Dist:
    """Rank, world size and device from the torchrun environment (one process when absent)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        backend = "nccl" if want_cuda else "gloo"
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group(backend)
        device = torch.device(f"cuda:{local}") if want_cuda else torch.device("cpu")
        if want_cuda:
            torch.cuda.set_device(device)
        return Dist(torch.distributed.get_rank(), world, device)
    device = torch.device(device_name if device_name not in ("auto",) else ("cuda" if want_cuda else "cpu"))
    return Dist(0, 1, device)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
