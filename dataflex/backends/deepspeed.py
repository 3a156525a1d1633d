"""`backend=deepspeed`: DeepSpeed's engine (ZeRO 0-3, fp32 or bf16), with our AdamW handed to it so no
fused optimizer op needs compiling on CPU.

A user's own DeepSpeed JSON (`backend.config=PATH`, or the launcher's `--deepspeed_config PATH`) is
taken as it is: its ZeRO stage and buckets, offload, bf16/fp16, gradient clipping, optimizer and
scheduler sections. dataflex fills only what it owns, the batch sizes: `train_batch_size` is
`trainer.global_batch_size`, `train_micro_batch_size_per_gpu` its share per rank and
`gradient_accumulation_steps` 1 (dataflex's step is one forward of the rank's whole share). A value in
the file that contradicts them is refused with both named (`"auto"` counts as unset). Without an
`optimizer` section the engine gets dataflex's AdamW (trainer.lr, weight decay); without a `scheduler`
section, dataflex's warmup + cosine schedule."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable, Optional

from dataflex.backends.base import Backend, lr_lambda, make_optimizer, setup_distributed
from dataflex.grad.interface import TorchInterface
from dataflex.models.forward import default_forward
from dataflex.utils.errors import ConfigError

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def _unset(value) -> bool:
    return value is None or value == "auto"


def read_deepspeed_config(path) -> dict:
    """A DeepSpeed JSON file as a dict; a missing or malformed file is a ConfigError naming it."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"backend.config={path}: no such DeepSpeed config file")
    try:
        out = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"backend.config={path}: not a readable DeepSpeed JSON file ({e})") from None
    if not isinstance(out, dict):
        raise ConfigError(f"backend.config={path}: a DeepSpeed config is a JSON object, got {type(out).__name__}")
    return out


def deepspeed_config(user: Optional[dict], global_batch_size: int, world_size: int, grad_clip: float = 1.0,
                     zero_stage: int = 0, bf16: bool = False, source: str = "backend.config") -> dict:
    """The config handed to `deepspeed.initialize`: the user's (or dataflex's default) with the batch
    sizes dataflex owns filled in, checked against the file (see the module docstring)."""
    if global_batch_size % world_size:
        raise ConfigError(f"trainer.global_batch_size={global_batch_size}: must divide by the {world_size} ranks")
    owned = {"train_batch_size": global_batch_size, "train_micro_batch_size_per_gpu": global_batch_size // world_size,
             "gradient_accumulation_steps": 1}
    if user is None:
        return {**owned, "gradient_clipping": grad_clip, "zero_optimization": {"stage": zero_stage},
                "bf16": {"enabled": bool(bf16)}, "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}
    cfg = copy.deepcopy(user)
    for key, value in owned.items():
        given = cfg.get(key)
        if not _unset(given) and given != value:
            raise ConfigError(
                f"{source}: {key}={given} in the DeepSpeed config contradicts dataflex's {key}={value} "
                f"(trainer.global_batch_size={global_batch_size} over {world_size} rank(s), one micro-batch of "
                f"{global_batch_size // world_size} per rank and step): remove {key} from the file or set "
                "trainer.global_batch_size to match")
        cfg[key] = value
    zero = cfg.get("zero_optimization")
    file_stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if file_stage is None:
        cfg["zero_optimization"] = {**(zero if isinstance(zero, dict) else {}), "stage": zero_stage}
    elif zero_stage and zero_stage != file_stage:
        raise ConfigError(f"backend.zero_stage={zero_stage} contradicts zero_optimization.stage={file_stage} in "
                          f"{source}: leave backend.zero_stage out (the file's stage is used) or make them agree")
    enabled = (cfg.get("bf16") or {}).get("enabled") if isinstance(cfg.get("bf16"), dict) else None
    if bf16 and enabled is False:
        raise ConfigError(f"backend.bf16=true contradicts bf16.enabled=false in {source}: make them agree")
    if _unset(enabled):
        cfg["bf16"] = {**(cfg.get("bf16") or {}), "enabled": bool(bf16)}
    if _unset(cfg.get("gradient_clipping")):
        cfg["gradient_clipping"] = grad_clip
    for key, value in (("steps_per_print", 10 ** 9), ("wall_clock_breakdown", False)):
        cfg.setdefault(key, value)
    offload = any(isinstance(z, dict) and (z.get("device") or "none") != "none"
                  for z in (cfg["zero_optimization"].get("offload_optimizer"), ))
    if offload and "optimizer" not in cfg:       # dataflex's torch AdamW on offloaded (CPU) parameters
        cfg.setdefault("zero_force_ds_cpu_optimizer", False)
    for section in ("optimizer", "scheduler"):
        if isinstance(cfg.get(section), dict):
            params = cfg[section].get("params") or {}
            if any(v == "auto" for v in params.values()):
                raise ConfigError(f"{source}: {section}.params has \"auto\" values (a Hugging Face Trainer "
                                  f"convention): give numbers, or drop the {section} section to use dataflex's")
    return cfg


class DeepSpeedBackend(Backend):
    name = "deepspeed"

    def __init__(self, model, micro_batch_size, zero_stage=0, bf16=False, lr=1e-3, weight_decay=0.0,
                 warmup_steps=0, max_steps=1000, grad_clip=1.0, config=None, world_size: Optional[int] = None):
        """`config`: the user's DeepSpeed JSON (a path or a dict), taken as it is but for the batch sizes
        (see the module docstring); None: dataflex's own (ZeRO `zero_stage`, `bf16`, `grad_clip`)."""
        setup_distributed("deepspeed")
        import deepspeed
        import torch

        world = world_size or (torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1)
        source = f"backend.config={config}" if isinstance(config, (str, Path)) else "backend.config"
        user = read_deepspeed_config(config) if isinstance(config, (str, Path)) else config
        self.config = deepspeed_config(user, micro_batch_size * world, world, grad_clip, zero_stage, bf16, source)
        if "optimizer" in self.config:        # the file's optimizer; dataflex's schedule unless it has its own
            optimizer = None
            scheduler = None if "scheduler" in self.config else (
                lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup_steps, max_steps)))
        else:
            optimizer, scheduler = make_optimizer(model, lr, weight_decay, warmup_steps, max_steps)
            if "scheduler" in self.config:
                scheduler = None
        from dataflex.backends.extensions import clear_stale_extension_locks
        clear_stale_extension_locks()      # a first start killed while compiling would make this one hang
        from dataflex.backends.extensions import announce_op_builds, optimizer_builders
        announce_op_builds(optimizer_builders(self.config))     # the file's optimizer may need an op compiled
        kwargs = {"model_parameters": [p for p in model.parameters() if p.requires_grad]} if optimizer is None else {}
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=copy.deepcopy(self.config), **kwargs)
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
        # ZeRO-3: the module called through ZeRO's own submodule hooks, which gather the partitioned
        # parameters for its forward and backward (the ghost hooks only read activations and output
        # gradients); below stage 3 the module holds them whole
        return ZeroModuleCall(self.engine) if self.zero_stage >= 3 else None

    def _zero3_error(self, what: str):
        return NotImplementedError(
            f"{what} need each rank to hold full parameters: ZeRO stage 3 partitions them. Use ZeRO 0-2 "
            "(backend.zero_stage), or per_sample_grad_norms / per_sample_grad_dots / FactoredProjector / "
            "SparseProjector, which run the module through ZeRO's hooks; losses and probes work under ZeRO-3.")

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


class ZeroModuleCall:
    """The engine's module called directly, for the gradient signals' forward and activation-only backward under
    ZeRO-3: ZeRO's hooks on each submodule gather (and release) its partitioned parameters as the engine's own
    forward would, but the engine's forward would also hook its outputs as a training backward: a signal's
    backward would then run the engine's backward prologue and epilogue (the next training backward added its
    gradient to the last step's stale partitions instead of replacing them: 2x, then 3x the true gradient) and
    scale the output gradients by 1 / gradient_accumulation_steps. `zero_optimization_stage` tells
    dataflex.grad.ghost that the head's weight is a partition (the logits path)."""

    def __init__(self, engine):
        self.engine = engine
        self.module = engine.module

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def zero_optimization_stage(self) -> int:
        return self.engine.zero_optimization_stage()
