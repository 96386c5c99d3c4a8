"""Process-group set-up from the launcher's environment (deepspeed, torchrun, or plain python)."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
import torch
import torch.distributed as dist

from trainer.errors import UsageError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def lone_process_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The launcher variables a lone `python trainer/train.py` lacks ({} under deepspeed/torchrun).

    DeepSpeed's engine reads LOCAL_RANK (and torch's env:// rendezvous the rest) from the process
    environment, so a lone process needs them too; only a command's main() applies them.
    """
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return {}
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
            "MASTER_ADDR": environ.get("MASTER_ADDR", "127.0.0.1"),
            "MASTER_PORT": environ.get("MASTER_PORT", str(_free_port()))}


def launcher_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from RANK/LOCAL_RANK/WORLD_SIZE.

    Never derived from the number of local devices (that breaks on a second node).
    """
    missing = [v for v in LAUNCHER_VARS if v not in os.environ and v != "LOCAL_RANK"]
    if missing:
        raise UsageError(f"launcher environment: {', '.join(missing)} not set: start the trainer "
                         "with deepspeed/torchrun, or through trainer/train.py's main(), which sets "
                         "them for a lone process (trainer.dist.lone_process_env)")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if not 0 <= rank < world:
        raise UsageError(f"launcher environment: RANK={rank} out of range for WORLD_SIZE={world}")
    return rank, local_rank, world


def init_distributed() -> DistInfo:
    """Initialise torch.distributed through DeepSpeed: nccl on GPUs, gloo on CPU."""
    import deepspeed
    rank, local_rank, world = launcher_env()
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        if backend == "gloo":
            _skip_shm_allreduce()
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return DistInfo(rank, local_rank, world, device)


def _skip_shm_allreduce() -> None:
    """Keep DeepSpeed's CPU shared-memory all-reduce op out of a training run.

    On CPU, DeepSpeed's comm backend builds that op and each rank of a one-machine job creates a
    66 MB /dev/shm/deepspeed_allreduce_buffer_* file that is never unlinked: a 2-rank run leaks
    132 MB of RAM (tmpfs) for good, until /dev/shm fills and later runs die with SIGBUS, or spin
    forever waiting for a peer's file that could not be created (DeepSpeed PR #4115's thread;
    seen here: 264 files, 18 GB). Only inference_all_reduce (tensor-parallel inference layers)
    uses the op; training's collectives go through torch.distributed. DeepSpeed keeps its
    compatibility table in one module dict so that edits persist: an op marked incompatible is
    not built (no ~30 s JIT build either) and the comm backend runs without it.
    """
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shut_down() -> None:
    """Wait for every rank, then end the process group through DeepSpeed.

    deepspeed.comm's destroy also drops the groups DeepSpeed cached (its clone of the world
    group): torch's alone leaves them pointing at the dead group, and the next
    deepspeed.initialize in this process (a notebook, a test) fails with "Group ... is not
    registered".
    """
    if not dist.is_initialized():
        return
    import deepspeed.comm
    dist.barrier()
    deepspeed.comm.destroy_process_group()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over all ranks (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def broadcast_text(text: str, device: torch.device, src: int = 0, max_bytes: int = 1024) -> str:
    """Rank `src`'s string on every rank (sent as bytes in a tensor; no pickling)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return text
    buf = torch.zeros(max_bytes + 1, dtype=torch.uint8, device=device)
    raw = text.encode("utf-8")[:max_bytes]
    buf[0] = 0
    buf[1:1 + len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
    length = torch.tensor([len(raw)], dtype=torch.int64, device=device)
    dist.broadcast(length, src=src)
    dist.broadcast(buf, src=src)
    return bytes(buf[1:1 + int(length)].tolist()).decode("utf-8")
