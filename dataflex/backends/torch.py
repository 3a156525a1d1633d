"""`backend=torch`: a plain module with AdamW (DistributedDataParallel on gloo/nccl when WORLD_SIZE > 1)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from dataflex.backends.base import Backend, make_optimizer
from dataflex.grad.interface import TorchInterface


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
                        "scheduler": self.scheduler.state_dict(), "client": client_state}, path / "state.pt.tmp")
            os.replace(path / "state.pt.tmp", path / "state.pt")      # never a half-written state.pt

    def load(self, path: Path) -> dict:
        from dataflex.utils.safeload import load_weights_only

        state = load_weights_only(path / "state.pt", "trainer.resume: checkpoint file")
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        return state["client"]
