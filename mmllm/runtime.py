"""Where code runs: the device and, under `torchrun`, the process group (gloo on CPU, nccl on GPU)."""

from __future__ import annotations

import dataclasses
import os

import torch

from mmllm.errors import UserError


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
    check_device(device_name)
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


def check_device(name: str) -> None:
    """Refuse, in one line and before any model loads, a --device this torch cannot use."""
    kind, _, index = name.partition(":")
    if kind == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise UserError(f"--device {name}: {why} (torch {torch.__version__}); use --device cpu or auto")
        count = torch.cuda.device_count()
        if index and (not index.isdigit() or int(index) >= count):
            raise UserError(f"--device {name}: this machine has {count} CUDA device(s): cuda:0 to cuda:{count - 1}")
    elif kind == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: Apple MPS is not available here; use --device cpu or auto")
    elif kind not in ("auto", "cpu", "cuda", "mps"):
        raise UserError(f"--device: use auto, cpu, cuda, cuda:N or mps (got '{name}')")


def pick_device(name: str) -> torch.device:
    check_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def shard(n: int, dist: Dist | None) -> range:
    """This rank's contiguous share of n items (all of them in a single process); shares differ by <= 1."""
    if dist is None or dist.world == 1:
        return range(n)
    return range(n * dist.rank // dist.world, n * (dist.rank + 1) // dist.world)


def gather(obj: object, dist: Dist | None) -> list:
    """Every rank's `obj`, in rank order (a one-item list in a single process)."""
    if dist is None or dist.world == 1:
        return [obj]
    out: list = [None] * dist.world
    torch.distributed.all_gather_object(out, obj)
    return out
