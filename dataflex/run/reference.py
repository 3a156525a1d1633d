"""A frozen reference model from an earlier dataflex run (Rho-1, DoReMi, RHO-LOSS).

    ref = load_reference("outputs/2026-11-24/10-00-00")          # the run's newest checkpoint
    ref = load_reference("outputs/.../checkpoints/step_0000300")  # or one checkpoint
    state.signals.probe(ids, output="token_loss", interface=ref)  # its losses on the same tokens

The run folder's `config.yaml` says which model to build (`model._target_` and its sizes); the
weights come from the checkpoint, written by either back end: the torch back end's `state.pt`
(`model`) or DeepSpeed's `mp_rank_00_model_states.pt` (`module`; ZeRO 0-2, where rank 0 holds the
whole model). The reference is put in eval mode with gradients off, and shares the current run's
tokenizer only if both runs used the same data config: the vocabulary sizes are checked, and the
caller should use the same `data` config.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Union

import torch

from dataflex.grad.interface import TorchInterface, register_reference_loader

DEEPSPEED_STATES = "mp_rank_00_model_states.pt"


def find_checkpoint(path: Union[str, Path]) -> Path:
    """A checkpoint folder: `path` itself, or the newest `checkpoints/step_N` of a run folder."""
    path = Path(path)
    if (path / "state.pt").exists() or (path / DEEPSPEED_STATES).exists():
        return path
    steps = sorted((p for p in (path / "checkpoints").glob("step_*") if p.is_dir()),
                   key=lambda p: int(re.sub(r"\D", "", p.name) or -1))
    for step in reversed(steps):
        if (step / "state.pt").exists() or (step / DEEPSPEED_STATES).exists():
            return step
    raise FileNotFoundError(
        f"no checkpoint under {path}: a reference model is an earlier run's folder trained with "
        "trainer.checkpoint_every=N (or one of its checkpoints/step_N folders)")


def run_dir_of(checkpoint: Path) -> Path:
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint


def load_model_weights(checkpoint: Path) -> dict:
    """The model's weights, read weights-only (a file that would run code when unpickled is refused)."""
    from dataflex.utils.safeload import load_weights_only

    if (checkpoint / "state.pt").exists():
        return load_weights_only(checkpoint / "state.pt", "reference model: checkpoint file")["model"]
    return load_weights_only(checkpoint / DEEPSPEED_STATES, "reference model: checkpoint file")["module"]


def load_reference(path: Union[str, Path], vocab_size: Optional[int] = None,
                   device: Optional[torch.device] = None) -> TorchInterface:
    """A TorchInterface over the frozen model of an earlier run (see the module docstring)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    checkpoint = find_checkpoint(path)
    config = run_dir_of(checkpoint) / "config.yaml"
    if not config.exists():
        raise FileNotFoundError(f"{config} is missing: the reference run's config says which model to build")
    model_cfg = OmegaConf.load(config).model
    weights = load_model_weights(checkpoint)
    vocab = next((w.shape[0] for k, w in weights.items() if k.endswith("tok_emb.weight")), None) \
        or model_cfg.get("vocab_size")
    if vocab_size is not None and vocab is not None and vocab != vocab_size:
        raise ValueError(f"reference model {checkpoint} has a vocabulary of {vocab} tokens, this run's has "
                         f"{vocab_size}: train the reference with the same data config and tokenizer")
    kwargs = {"vocab_size": vocab} if vocab else {}
    model = instantiate(model_cfg, **kwargs)
    model.load_state_dict(weights)
    model.eval().requires_grad_(False)
    if device is not None:
        model.to(device)
    return TorchInterface(model)


register_reference_loader(load_reference)
