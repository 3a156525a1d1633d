"""The one interface between model and data: per-sample loss, per-sample gradients, probes.

Plugins never touch the model; they ask for these signals through the run's DataState. The same
calls work for a plain torch module and a DeepSpeed engine (ZeRO 0-2 for gradients; probes and
losses under every ZeRO stage, since the engine's own forward gathers partitioned parameters).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .grads import ParamSpec, PerSampleGrads, default_forward, per_sample_grads
from .loss import per_sample_loss
from .projection import RademacherProjector

OUTPUTS = ("loss", "logits", "outputs")


class TorchInterface:
    def __init__(self, module: torch.nn.Module, forward: Callable = default_forward):
        self.module = module
        self.forward = forward

    def _call(self):
        return self.module

    @torch.no_grad()
    def probe(self, batch: dict, output: str = "loss"):
        """Forward without gradients: per-sample losses, logits, or the model's raw outputs."""
        if output not in OUTPUTS:
            raise ValueError(f"probe output must be one of {OUTPUTS}, got {output!r}")
        was_training = self.module.training
        self.module.eval()
        try:
            if output == "outputs":
                return self._call()(batch["input_ids"], position_ids=batch["position_ids"])
            logits = self.forward(self._call(), batch)
            if output == "logits":
                return logits
            return per_sample_loss(logits, batch["labels"], batch["loss_mask"]).float()
        finally:
            self.module.train(was_training)

    def per_sample_loss(self, batch: dict) -> torch.Tensor:
        return self.probe(batch, "loss")

    def per_sample_grads(self, batch: dict, params: ParamSpec = "all",
                         projector: Optional[RademacherProjector] = None, chunk_size: int = 16) -> PerSampleGrads:
        return per_sample_grads(self.module, batch, params, projector, chunk_size, self.forward)


class DeepSpeedInterface(TorchInterface):
    def __init__(self, engine, forward: Callable = default_forward):
        super().__init__(engine.module, forward)
        self.engine = engine
        self.zero_stage = engine.zero_optimization_stage()

    def _call(self):
        return self.engine

    def per_sample_grads(self, batch, params="all", projector=None, chunk_size=16):
        if self.zero_stage >= 3:
            raise NotImplementedError(
                "per-sample gradients need each rank to hold full parameters: ZeRO stage 3 partitions "
                "them. Use ZeRO 0-2 (backend.zero_stage) for gradient-based plugins; losses and probes "
                "work under ZeRO-3.")
        return super().per_sample_grads(batch, params, projector, chunk_size)
