"""The few collectives dataflex needs; every call degrades to a no-op in one process.

Collectives run on the process group's device: CUDA tensors under NCCL (a collective on a CPU
tensor fails there), CPU tensors under gloo. Callers pass tensors on any device and get the result
back on the device they passed (a CPU tensor in, a CPU tensor out), so host-side state such as the
sampler's ids and the plugins' statistics stays on the host while the wire is the group's own.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

_group = None     # the group dataflex's collectives run on; None: the default group (every rank)


def use_group(group) -> None:
    """Run dataflex's collectives (`all_gather_cat`, `broadcast_object`, `barrier`) on `group`: the
    Megatron back end passes its data-parallel group, so per-sample signals are gathered over the
    ranks that hold different samples, not over the tensor/pipeline ranks that share them. `rank()`
    and `world_size()` stay global (rank 0 writes the run's outputs). None restores the default."""
    global _group
    _group = group


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(_group) > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def comm_device() -> torch.device:
    """The device the default process group's collectives run on: this rank's CUDA device under NCCL
    (LOCAL_RANK, else the current device), the CPU otherwise (gloo, or no group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return torch.device("cpu")
    if "nccl" in str(dist.get_backend()).lower():
        local = os.environ.get("LOCAL_RANK")
        return torch.device("cuda", int(local) if local is not None else torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's tensor along dim 0, in rank order; sizes may differ. The result is on
    `t`'s device, whatever device the collective ran on."""
    if not is_distributed():
        return t
    return _all_gather_cat(t)


def _all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    device, home = comm_device(), t.device
    n = dist.get_world_size(_group)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(n)]
    dist.all_gather(sizes, torch.tensor([t.shape[0]], dtype=torch.long, device=device), group=_group)
    sizes = [int(s) for s in sizes]
    dtype = t.dtype
    wire = torch.uint8 if dtype == torch.bool else dtype          # NCCL has no bool
    padded = torch.zeros((max(sizes),) + tuple(t.shape[1:]), dtype=wire, device=device)
    padded[:t.shape[0]] = t.detach().to(device=device, dtype=wire)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=_group)
    return torch.cat([p[:k] for p, k in zip(parts, sizes)]).to(device=home, dtype=dtype)


def broadcast_object(obj, src: int = 0):
    if not is_distributed():
        return obj
    return _broadcast_object(obj, src)


def _broadcast_object(obj, src: int = 0):
    box = [obj]
    src = dist.get_global_rank(_group, src) if _group is not None else src     # `src` counts within the group
    dist.broadcast_object_list(box, src=src, device=comm_device(), group=_group)
    return box[0]


def barrier() -> None:
    if is_distributed():
        device = comm_device()
        if device.type == "cuda":
            dist.barrier(device_ids=[device.index], group=_group)
        else:
            dist.barrier(group=_group)


def leave_group() -> None:
    """The end of a run that made its process group: every rank waits for the others, then the group is
    destroyed. A rank that exits with a live gloo group while another still talks to it can abort in
    gloo's teardown ("terminate called without an active exception", about 1 exit in 10 on 2 CPU ranks)."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            barrier()
        dist.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
