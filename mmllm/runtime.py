"""Where code runs: the device and, under `torchrun`, the process group (gloo on CPU, nccl on GPU)."""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable

import torch

from mmllm import console
from mmllm.config import device_grammar
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
        rank = torch.distributed.get_rank()
        console.set_rank(rank)  # one copy of the plan, the progress bars and the warnings: rank 0's
        if rank:
            warnings.simplefilter("ignore")  # Python's warnings (PyTorch's, transformers') too
        return Dist(rank, world, device)
    device = torch.device(device_name if device_name not in ("auto",) else ("cuda" if want_cuda else "cpu"))
    return Dist(0, 1, device)


def check_device(name: str) -> None:
    """Refuse, in one line and before any model loads, a --device this torch cannot use."""
    if problem := device_grammar(name):
        raise UserError(problem)
    kind, _, index = name.partition(":")
    if kind == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise UserError(f"--device {name}: {why} (torch {torch.__version__}); use --device cpu or auto")
        count = torch.cuda.device_count()
        if index and int(index) >= count:
            raise UserError(f"--device {name}: this machine has {count} CUDA device(s): cuda:0 to cuda:{count - 1}")
    elif kind == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: Apple MPS is not available here; use --device cpu or auto")


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


SMALL_STEP_FLOPS = 1e9  # a forward below this runs on one thread: the fusion models and heads over stored features


def cpu_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def forward_flops(model: torch.nn.Module, batch: dict) -> float | None:
    """FLOPs of one forward of `model` on `batch` (torch.utils.flop_counter), in eval mode and without touching the
    random state, so the run that follows is the one it would have been; None when they cannot be counted."""
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.eval()
            model(batch)
        return float(counter.get_total_flops())
    except Exception:  # noqa: BLE001 - a model the counter cannot follow keeps the default threads
        return None
    finally:
        model.train(was)


def choose_threads(flag: int, flops: float | None) -> tuple[int, str]:
    """CPU threads for training, and why: --threads N; else OMP_NUM_THREADS when set; else one thread for a
    forward under SMALL_STEP_FLOPS (with several, each small op waits for the slowest core, and a core that
    another process keeps busy makes every op wait: 10-25x slower steps measured), every core for more."""
    if flag > 0:
        return flag, "--threads"
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS"
    if flops is None:
        return cpu_cores(), "every core (the step's size could not be measured)"
    if flops < SMALL_STEP_FLOPS:
        return 1, f"{flops / 1e9:.2g} GFLOP per forward: small ops run on one thread"
    return cpu_cores(), f"{flops / 1e9:.3g} GFLOP per forward: every core"


def use_threads(flag: int, device: torch.device, probe: Callable[[], float | None]) -> int | None:
    """Set torch's CPU threads for the work (`choose_threads`; `probe` measures its forward only when the choice
    needs it) and log the choice; nothing on a GPU without --threads. The number set, or None."""
    from mmllm.console import log

    if device.type != "cpu" and flag <= 0:
        return None
    needs = flag <= 0 and not os.environ.get("OMP_NUM_THREADS", "").isdigit()
    n, why = choose_threads(flag, probe() if needs else None)
    torch.set_num_threads(n)
    log(f"threads: {n} ({why}" + ("; --threads N to change)" if flag <= 0 else ")"))
    return n
