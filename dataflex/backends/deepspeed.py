"""`backend=deepspeed`: DeepSpeed's engine (ZeRO 0-3, fp32 or bf16), with our AdamW handed to it so no
fused optimizer op needs compiling on CPU."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from dataflex.backends.base import Backend, make_optimizer, setup_distributed
from dataflex.grad.interface import TorchInterface
from dataflex.models.forward import default_forward


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
        from dataflex.backends.extensions import clear_stale_extension_locks
        clear_stale_extension_locks()      # a first start killed while compiling would make this one hang
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
        self.model, self.module = self.engine, self.engine.module
        self.device = self.engine.device
        self.interface = DeepSpeedInterface(self.engine)

    def step(self, loss):
        self.engine.backward(loss)
        self.engine.step()

    def save(self, path: Path, client_state: dict) -> None:
        self.engine.save_checkpoint(str(path.parent), tag=path.name, client_state={"dataflex": client_state},
                                    save_latest=False)     # launch/train.py writes `latest` after the rename

    def load(self, path: Path) -> dict:
        """Every file of the checkpoint passes a weights-only load (tensors, plain containers and four
        DeepSpeed data classes: its ZeRO stage enum, loss scalers and fragment addresses) before DeepSpeed's
        engine unpickles it in full (its loader has no weights-only mode): a file that would run code is
        refused before the engine sees it."""
        from dataflex.utils.safeload import check_weights_only

        check_weights_only(path, "trainer.resume: DeepSpeed checkpoint file", deepspeed_safe_globals())
        _, client = self.engine.load_checkpoint(str(path.parent), tag=path.name)
        return client["dataflex"]


def deepspeed_safe_globals() -> list:
    """DeepSpeed's plain data classes its checkpoints pickle (ZeRO 1-3 optimizer files): allowed to a
    weights-only load, which rebuilds them from their fields and calls nothing else."""
    import importlib

    out = []
    for name in ("deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.runtime.fp16.loss_scaler.LossScaler",
                 "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                 "deepspeed.utils.tensor_fragment.fragment_address"):
        module, _, attr = name.rpartition(".")
        try:
            out.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            pass
    return out


class DeepSpeedInterface(TorchInterface):
    def __init__(self, engine, forward: Callable = default_forward):
        super().__init__(engine.module, forward)
        self.engine = engine
        self.zero_stage = engine.zero_optimization_stage()

    @property
    def device(self):
        """The engine's device (under ZeRO-3 the module's parameters are partitioned placeholders)."""
        return self.engine.device

    def _call(self):
        return self.engine

    def _hook_call(self):
        # ZeRO-3: the engine's forward gathers the partitioned parameters (the hooks only read
        # activations and output gradients); below stage 3 the module holds them whole
        return self.engine if self.zero_stage >= 3 else None

    def _zero3_error(self, what: str):
        return NotImplementedError(
            f"{what} need each rank to hold full parameters: ZeRO stage 3 partitions them. Use ZeRO 0-2 "
            "(backend.zero_stage), or per_sample_grad_norms / per_sample_grad_dots / FactoredProjector / "
            "SparseProjector, which run through the engine's forward; losses and probes work under ZeRO-3.")

    def per_sample_grads(self, batch, params="all", projector=None, chunk_size=16, train_mode=False):
        if self.zero_stage >= 3 and not (getattr(projector, "factored", False)
                                         or getattr(projector, "engine", None) == "hooks"):
            raise self._zero3_error("exact per-sample gradients through torch.func (and dense projections of them)")
        return super().per_sample_grads(batch, params, projector, chunk_size, train_mode)

    @staticmethod
    def full_optimizer_state(param, key: str):
        """One parameter's optimizer state (`exp_avg`, ...) assembled from ZeRO's flat partitions; a collective."""
        from deepspeed.utils import safe_get_full_optimizer_state
        return safe_get_full_optimizer_state(param, key)

    def batch_grad(self, batch, params="all", reduction="mean"):
        if self.zero_stage >= 3:
            raise self._zero3_error("batch_grad's functional call")
        return super().batch_grad(batch, params, reduction)
