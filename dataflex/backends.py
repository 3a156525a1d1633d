"""Training back ends behind one small surface: forward, step, save, load, and the signal interface.

`torch`: a plain module with AdamW (DistributedDataParallel on gloo/nccl when WORLD_SIZE > 1).
`deepspeed`: DeepSpeed's engine (ZeRO 0-3, fp32 or bf16), with our AdamW handed to it so no fused
optimizer op needs compiling on CPU.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from .grads import default_forward
from .interface import DeepSpeedInterface, TorchInterface
from .launching import free_port


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
    """`model` is what the training forward calls (the module, DDP or the engine)."""
    model = None
    device = torch.device("cpu")

    def to_device(self, batch):
        return {k: v.to(self.device) for k, v in batch.items()}

    def forward(self, batch):
        return default_forward(self.model, batch)


def setup_distributed(backend: str) -> None:
    """Join the process group the launcher describes (deepspeed, torchrun), or make a group of one."""
    if torch.distributed.is_initialized():
        return
    if backend == "deepspeed":
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
        ensure_process_env()
        import deepspeed
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, model, lr=1e-3, weight_decay=0.0, warmup_steps=0, max_steps=1000, grad_clip=1.0):
        self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
        self.module = model.to(self.device)
        self.model = self.module
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(self.module)
        self.optimizer, self.scheduler = make_optimizer(self.module, lr, weight_decay, warmup_steps, max_steps)
        self.grad_clip = grad_clip
        self.interface = TorchInterface(self.module)

    def step(self, loss):
        loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def save(self, path: Path, client_state: dict) -> None:
        path.mkdir(parents=True, exist_ok=True)
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            torch.save({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(), "client": client_state}, path / "state.pt")

    def load(self, path: Path) -> dict:
        state = torch.load(path / "state.pt", weights_only=False)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        return state["client"]


class DeepSpeedBackend(Backend):
    name = "deepspeed"

    def __init__(self, model, micro_batch_size, zero_stage=0, bf16=False, lr=1e-3, weight_decay=0.0,
                 warmup_steps=0, max_steps=1000, grad_clip=1.0):
        setup_distributed("deepspeed")
        import deepspeed

        optimizer, scheduler = make_optimizer(model, lr, weight_decay, warmup_steps, max_steps)
        config = {
            "train_micro_batch_size_per_gpu": micro_batch_size,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": grad_clip,
            "zero_optimization": {"stage": zero_stage},
            "bf16": {"enabled": bool(bf16)},
            "steps_per_print": 10 ** 9,
            "wall_clock_breakdown": False,
        }
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
        self.model, self.module = self.engine, self.engine.module
        self.device = self.engine.device
        self.interface = DeepSpeedInterface(self.engine)

    def step(self, loss):
        self.engine.backward(loss)
        self.engine.step()

    def save(self, path: Path, client_state: dict) -> None:
        self.engine.save_checkpoint(str(path.parent), tag=path.name, client_state={"dataflex": client_state})

    def load(self, path: Path) -> dict:
        _, client = self.engine.load_checkpoint(str(path.parent), tag=path.name)
        return client["dataflex"]


def build_backend(name: str, model, global_batch_size: int, world_size: int, **kwargs):
    if name == "torch":
        kwargs.pop("zero_stage", None), kwargs.pop("bf16", None)
        return TorchBackend(model, **kwargs)
    if name == "deepspeed":
        return DeepSpeedBackend(model, global_batch_size // world_size, **kwargs)
    raise ValueError(f"unknown backend {name!r}; available backends: deepspeed, torch")
