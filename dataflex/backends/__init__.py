"""Training back ends behind one small surface: forward, step, save, load, and the signal interface.

`torch` (`torch.py`): a plain module with AdamW (DistributedDataParallel on gloo/nccl when WORLD_SIZE > 1).
`deepspeed` (`deepspeed.py`): DeepSpeed's engine (ZeRO 0-3, fp32 or bf16), with our AdamW handed to it
so no fused optimizer op needs compiling on CPU.
`megatron` (`megatron.py`): a megatron.core GPTModel trained through Megatron's own forward/backward
schedule and optimizer, tensor/pipeline/data parallel; on a machine without CUDA through the CPU
device shim in `megatron_cpu.py`. Imported only when asked for.
"""
from __future__ import annotations

from dataflex.backends.base import Backend, ensure_process_env, lr_lambda, make_optimizer, setup_distributed
from dataflex.backends.deepspeed import DeepSpeedBackend
from dataflex.backends.torch import TorchBackend

BACKENDS = ("deepspeed", "megatron", "torch")

__all__ = ["BACKENDS", "Backend", "DeepSpeedBackend", "TorchBackend", "build_backend", "ensure_process_env",
           "lr_lambda", "make_optimizer", "setup_distributed"]


def __getattr__(name):
    if name == "MegatronBackend":          # megatron.core is imported only when this back end is used
        from dataflex.backends.megatron.backend import MegatronBackend
        return MegatronBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_backend(name: str, model, global_batch_size: int, world_size: int, options=None, seed: int = 0, **kwargs):
    """`options`: the `backend` config (keys past `name` that a back end takes beyond the common ones)."""
    options = {k: v for k, v in dict(options or {}).items() if k != "name"}
    if name == "torch":
        kwargs.pop("zero_stage", None), kwargs.pop("bf16", None)
        return TorchBackend(model, **kwargs)
    if name == "deepspeed":      # backend.config: the user's DeepSpeed JSON (None: dataflex's own)
        return DeepSpeedBackend(model, global_batch_size // world_size, config=options.get("config"),
                                world_size=world_size, **kwargs)
    if name == "megatron":
        from dataflex.backends.megatron.backend import MegatronBackend
        from dataflex.backends.megatron.model import model_sizes
        kwargs.pop("zero_stage", None)
        kwargs.update(options)
        return MegatronBackend(model_sizes(model), global_batch_size, seed=seed, **kwargs)
    raise ValueError(f"unknown backend {name!r}; available backends: {', '.join(BACKENDS)}")
