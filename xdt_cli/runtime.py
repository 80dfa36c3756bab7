"""The one place that decides the device, this process's rank, and whether it writes files.

Everything else asks a `Runtime`. Under torchrun the environment carries RANK, WORLD_SIZE
and LOCAL_RANK; `Runtime.from_env` reads them and joins the process group (gloo on the CPU,
NCCL on CUDA, each rank on cuda:LOCAL_RANK), so a multi-process launch changes this module,
the streams' shares and the engine's gradient reduction (distributed.py), not every caller.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from xdt_cli.distributed import Shard
from xdt_cli.errors import ConfigError


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes the run folder and prints."""
        return self.rank == 0

    @property
    def shard(self) -> Shard:
        return Shard(self.rank, self.world_size)

    @classmethod
    def from_env(cls, device: str) -> Runtime:
        """One process, or this rank of a torchrun launch (joining its process group once)."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls(device=resolve_device(device))
        rank, local_rank = env_rank(), int(os.environ.get("LOCAL_RANK", "0"))
        resolved = _rank_device(device, local_rank)
        if not dist.is_initialized():
            backend = "nccl" if resolved.type == "cuda" else "gloo"
            dist.init_process_group(backend)
        if dist.get_world_size() != world_size:
            raise ConfigError(f"WORLD_SIZE={world_size} but the process group has another size")
        return cls(device=resolved, rank=rank, world_size=world_size)


def env_rank() -> int:
    """This process's rank under torchrun (RANK), 0 outside it: known before any setup, so
    the CLI can keep ranks other than 0 quiet."""
    return int(os.environ.get("RANK", "0"))


def _rank_device(spec: str, local_rank: int) -> torch.device:
    """Under torchrun each rank takes cuda:LOCAL_RANK (`auto` or `cuda`), or the CPU."""
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if spec not in ("auto", "cuda"):
        raise ConfigError(
            f"device: '{spec}' under torchrun: each rank takes cuda:LOCAL_RANK; use auto, cuda "
            "or cpu (CUDA_VISIBLE_DEVICES chooses the GPUs)"
        )
    device = resolve_device(f"cuda:{local_rank}")
    torch.cuda.set_device(device)
    return device


def resolve_device(spec: str) -> torch.device:
    """`auto` picks CUDA when present; `cuda`/`cuda:N` must exist (ConfigError otherwise)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(
            f"device: '{spec}' is not a device; use auto, cpu, cuda or cuda:N"
        ) from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ConfigError(f"device: '{spec}' is not supported; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"device: '{spec}' was asked for, but CUDA is not available here")
    index = device.index if device.index is not None else 0
    if index >= torch.cuda.device_count():
        raise ConfigError(
            f"device: '{spec}' does not exist; this machine has {torch.cuda.device_count()} "
            "CUDA device(s)"
        )
    return torch.device("cuda", index)


@contextlib.contextmanager
def stop_signals(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """Route SIGINT and SIGTERM to `handler` inside the block, then restore the old handlers.

    Off the main thread Python cannot install handlers; the block then runs without them.
    """
    try:
        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed every generator a run may touch and choose deterministic kernels."""
    random.seed(seed)
    torch.manual_seed(seed)  # seeds the CPU and all CUDA generators
    set_deterministic(deterministic)


def set_deterministic(deterministic: bool) -> None:
    """Choose deterministic kernels (or the fastest ones, with cuDNN autotuning)."""
    if deterministic:
        # cuBLAS needs this before its first call to be deterministic (PyTorch docs,
        # "Reproducibility"); it has no effect on the CPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic


def autocast_for(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context of a resolved precision (fp32: none). Training and evaluation
    share it, so `xdt evaluate` scores a checkpoint exactly as the run did."""
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device_type=device.type, dtype=dtype)
    return contextlib.nullcontext()


def resolve_precision(precision: str, device: torch.device) -> str:
    """Mixed precision is for CUDA: `auto` is bf16 where supported (else fp16); CPU is fp32."""
    if device.type != "cuda":
        return "fp32"
    if precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return precision
