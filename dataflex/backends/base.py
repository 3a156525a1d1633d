"""What every back end shares: the process environment, the optimizer and schedule, the base class."""
from __future__ import annotations

import math
import os

import torch

from dataflex.models.forward import default_forward
from dataflex.models.lean import lean_forward
from dataflex.utils.dist import free_port


def ensure_process_env() -> None:
    """A launcher-less single process still needs the variables torch.distributed reads."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def lr_lambda(warmup_steps: int, max_steps: int, min_ratio: float = 0.1):
    def f(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def make_optimizer(model, lr, weight_decay, warmup_steps, max_steps):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup_steps, max_steps))


class Backend:
    """`model` is what the training forward calls (the module, DDP or the engine). The data-parallel
    rank and size are what DataFlex slices batches by (None: the global rank and world size; the
    Megatron back end sets them when tensor or pipeline ranks share samples)."""
    model = None
    device = torch.device("cpu")
    data_parallel_rank = None
    data_parallel_size = None

    def to_device(self, batch):
        return {k: v.to(self.device) for k, v in batch.items()}

    def forward(self, batch, lean: bool = False):
        """Logits, or with `lean=True` the model's hidden states and head (`dataflex.core.lean_loss.LeanOutput`)
        where it offers them (the logits otherwise)."""
        forward = getattr(getattr(self, "interface", None), "forward", default_forward)   # HF models: dataflex.models.hf
        if lean:
            out = lean_forward(forward, self.model, batch)
            if out is not None:
                return out
        return forward(self.model, batch)


def setup_distributed(backend: str) -> bool:
    """Join the process group the launcher describes (deepspeed, torchrun), or make a group of one.
    True when this call made the group (its maker ends it: `dataflex.utils.dist.leave_group`)."""
    if torch.distributed.is_initialized():
        return False
    if torch.cuda.is_available():      # NCCL collectives and barriers use the current device: this rank's
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if backend == "deepspeed":
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
        ensure_process_env()
        import deepspeed

        from dataflex.backends.extensions import announce_op_builds, release_shm_buffer
        announce_op_builds(["ShareMemCommBuilder"])    # a first start compiles the CPU comm op: said at once
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        release_shm_buffer()                           # its CPU comm buffer leaves nothing in /dev/shm
    elif backend == "megatron" or int(os.environ.get("WORLD_SIZE", "1")) > 1:   # Megatron needs a group even alone
        ensure_process_env()
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    else:
        return False
    return True


