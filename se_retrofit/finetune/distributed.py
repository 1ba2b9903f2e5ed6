"""Processes and devices: one process, or many under ``torchrun`` with DistributedDataParallel.

``torchrun --nproc_per_node=N -m se_retrofit finetune ...`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; each process then trains on its shard of the data (gloo on CPU, nccl on GPUs, one
GPU per process) and only rank 0 writes files and prints.

Example:
    >>> context = Context.from_env({}, "cpu")
    >>> context.world_size, context.is_main, context.device.type
    (1, True, 'cpu')
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import nn

from ..errors import RetrofitError


class DeviceError(RetrofitError):
    """The requested device cannot be used."""


@dataclass(frozen=True)
class Context:
    """Where this process runs: its rank among ``world_size`` processes and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, device: str = "auto") -> "Context":
        """Read torchrun's variables (none: one process) and pick the device (``auto``: this
        process's GPU when CUDA is there, else the CPU)."""
        rank, world, local = ranks_from_env(env)
        return cls(rank, world, local, pick_device(device, local))


def ranks_from_env(env: Mapping[str, str] | None = None) -> tuple[int, int, int]:
    """``(RANK, WORLD_SIZE, LOCAL_RANK)`` as torchrun sets them (0, 1, 0 when unset); a value that is not
    a whole number in range is a :class:`RetrofitError` naming the variable.

    Example:
        >>> ranks_from_env({"RANK": "1", "WORLD_SIZE": "2"})
        (1, 2, 0)
    """
    env = os.environ if env is None else env
    values = {}
    for key, default, low in (("RANK", 0, 0), ("WORLD_SIZE", 1, 1), ("LOCAL_RANK", 0, 0)):
        text = env.get(key, "").strip() or str(default)
        if not text.isdigit() or not low <= int(text) < 65536:
            raise RetrofitError(f"environment variable {key}={env.get(key)!r} is not a whole number from {low} to "
                                "65535 (torchrun sets it; unset it to run one process)")
        values[key] = int(text)
    if values["RANK"] >= values["WORLD_SIZE"]:
        raise RetrofitError(f"environment variable RANK={values['RANK']} is not below WORLD_SIZE="
                            f"{values['WORLD_SIZE']} (torchrun sets both; unset them to run one process)")
    return values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]


def main_process_from_env() -> bool:
    """Whether this process reports errors: rank 0 of a valid torchrun group, or any process whose
    RANK / WORLD_SIZE are unset or invalid (then it is the only one to say so)."""
    try:
        return ranks_from_env()[0] == 0
    except RetrofitError:
        return True


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` (this process's GPU) or ``cuda:N``; an unusable choice is an error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r} asked for, but CUDA is not available here; use --device cpu")
        index = device.index if device.index is not None else local_rank % torch.cuda.device_count()
        if index >= torch.cuda.device_count():
            raise DeviceError(f"device cuda:{index} does not exist ({torch.cuda.device_count()} GPUs)")
        device = torch.device("cuda", index)
    elif device.type != "cpu":
        raise DeviceError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def start(context: Context) -> None:
    """Join the process group (gloo on CPU, nccl on GPU) when running under torchrun."""
    if not context.distributed or dist.is_initialized():
        return
    if context.device.type == "cuda":
        torch.cuda.set_device(context.device)
        dist.init_process_group("nccl", device_id=context.device)
    else:
        dist.init_process_group("gloo")


def stop(context: Context, *, wait: bool = True) -> None:
    """Leave the process group; with ``wait`` after every process got here (not after an error)."""
    if context.distributed and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


@contextmanager
def main_first(context: Context) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. downloads weights into the cache), the others after it."""
    if context.distributed and not context.is_main:
        dist.barrier()
    yield
    if context.distributed and context.is_main:
        dist.barrier()


def wrap(model: nn.Module, context: Context) -> nn.Module:
    """DistributedDataParallel around ``model`` when distributed (else ``model`` itself).

    Build it after the phase's ``requires_grad`` flags are set: DDP registers gradient hooks only for
    parameters that require grad when it is built, so it is built again at each phase change.
    Every trainable parameter takes part in each forward (the edited blocks call their attention
    module unconditionally), so ``find_unused_parameters`` stays off.
    """
    if not context.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [context.device.index] if context.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False)


def sum_across(values: torch.Tensor, context: Context) -> torch.Tensor:
    """The element-wise sum of ``values`` over all processes."""
    if context.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def gather(obj: Any, context: Context) -> list[Any]:
    """One picklable object from each process, in rank order (on every process)."""
    if not context.distributed:
        return [obj]
    out: list[Any] = [None] * context.world_size
    dist.all_gather_object(out, obj)
    return out


def sync_buffers(model: nn.Module, context: Context) -> None:
    """Give every process rank 0's buffers (BatchNorm running statistics) before evaluating or saving."""
    if context.distributed:
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)
