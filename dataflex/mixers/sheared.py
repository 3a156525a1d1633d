"""Sheared-LLaMA dynamic batch loading (Xia, Gao, Zeng, Chen; ICLR 2024).

At each evaluation, with per-domain validation losses l and fixed reference losses l_ref (the loss
a model of the target size should reach on each domain):

    paper (clip=True):   Delta = max(l - l_ref, 0);  alpha <- softmax(log alpha + Delta)
    code  (clip=False):  Delta = l - l_ref           (update_type="doremi" does not clip)
    both:                alpha <- (1 - c) alpha + c / K        (c = smoothing, 1e-4 in the code)

so the domain furthest above its reference gains weight; with clipping, the weights stop moving
once every domain is at or below its reference. Reference losses are given per domain
(`reference_loss: {domain: loss}`) or read from an earlier dataflex run (`reference: RUN_DIR`, the
final `val_loss` of its summary.json, or the path of a summary.json itself).

The update runs on the run's evaluations (EVAL_END, every `trainer.eval_every` steps), or, with
`update_every: N`, on the mixer's own schedule: every N steps it probes the validation set
(`state.signals.val_loss`, at most `val_samples` per domain).

Which mean: a domain's validation loss here is the mean over its samples of each sample's mean token
loss (the run's evaluation and `Signals.val_loss` both average per-sample means); the reference code's
evaluation is a token mean over the domain (every label token counts once). The two differ when the
domain's samples differ in length (documents shorter than `seq_len`: short samples count more here);
reference losses read from a dataflex run (`reference: RUN_DIR`) use the same mean as l, so l - l_ref
compares like with like; reference losses taken from the reference code's evaluation would not.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

from dataflex.core.events import Event
from dataflex.core.plugin import Mixer
from dataflex.core.state import DataState
from dataflex.mixers.static import WeightSpec, resolve_weights


def sheared_update(alpha: torch.Tensor, loss: torch.Tensor, reference: torch.Tensor, clip: bool = True,
                   smoothing: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """(new alpha, Delta). A domain with no loss (NaN) gets Delta = 0."""
    delta = loss.double() - reference.double()
    delta = torch.nan_to_num(delta, nan=0.0)
    if clip:
        delta = delta.clamp(min=0)
    new = torch.softmax(torch.log(alpha.double()) + delta, 0)
    return (1 - smoothing) * new + smoothing / alpha.numel(), delta


def read_reference(reference, domains: Sequence[str]) -> torch.Tensor:
    """[K] reference losses from {domain: loss} or a run directory / summary.json (its `val_loss`)."""
    if isinstance(reference, (str, Path)):
        path = Path(reference)
        path = path / "summary.json" if path.is_dir() else path
        if not path.is_file():
            raise ValueError(f"sheared: reference run has no summary.json: {path}")
        summary = json.loads(path.read_text())
        reference = summary.get("val_loss") or {}
        if not reference:
            raise ValueError(f"sheared: {path} has no final val_loss (was the run given validation data?)")
    if not isinstance(reference, Mapping):
        raise ValueError(f"sheared: reference losses must be {{domain: loss}} or a run directory, got {reference!r}")
    missing = [d for d in domains if d not in reference]
    if missing:
        raise ValueError(f"sheared: no reference loss for domain(s) {missing}; given {sorted(reference)}")
    return torch.tensor([float(reference[d]) for d in domains], dtype=torch.float64)


class ShearedMixer(Mixer):
    # checked before any data is read (dataflex.core.settings)
    SETTINGS = {"smoothing": "[0, 1)", "update_every": "[1, inf)", "val_samples": "[1, inf)"}
    def __init__(self, reference_loss: Optional[Mapping[str, float]] = None, reference: Optional[str] = None,
                 clip: bool = True, smoothing: float = 1e-4, initial_weights: WeightSpec = "size",
                 update_every: Optional[int] = None, val_samples: Optional[int] = None):
        if (reference_loss is None) == (reference is None):
            raise ValueError("sheared needs exactly one of reference_loss ({domain: loss}) or reference (RUN_DIR)")
        self.reference_spec = reference_loss if reference_loss is not None else reference
        self.clip, self.smoothing, self.initial_weights = clip, smoothing, initial_weights
        self.update_every, self.val_samples = update_every, val_samples
        self.alpha: Optional[torch.Tensor] = None
        self.delta: Optional[torch.Tensor] = None
        self.updates = 0
        self.trained = False

    def setup(self, state: DataState) -> None:
        self.reference = read_reference(self.reference_spec, state.domains)
        if self.alpha is None:
            self.alpha = resolve_weights(self.initial_weights, state.domains, self.domain_sizes(state).tolist())

    def weights(self, state: DataState) -> torch.Tensor:
        if self.delta is not None:   # the last update's statistics on every step's log line
            for d, name in enumerate(state.domains):
                state.metrics[f"sheared/excess/{name}"] = float(self.delta[d])
        return self.alpha

    def update(self, event: Event, state: DataState) -> None:
        if event == Event.BATCH_END:
            self.trained = True
        if self.update_every is None and event == Event.EVAL_END and self.trained:  # not the run's initial one
            loss = torch.tensor([state.val_loss.get(d, float("nan")) for d in state.domains], dtype=torch.float64)
        elif self.update_every and event == Event.BATCH_END and (state.step + 1) % self.update_every == 0:
            loss = state.signals.val_loss(max_per_domain=self.val_samples)
        else:
            return
        self.alpha, self.delta = sheared_update(self.alpha, loss, self.reference, self.clip, self.smoothing)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"alpha": self.alpha, "delta": self.delta, "updates": self.updates, "trained": self.trained}

    def load_state_dict(self, sd: dict) -> None:
        self.alpha, self.delta, self.updates, self.trained = sd["alpha"], sd["delta"], sd["updates"], sd["trained"]
