"""Plugins: small state machines that act on named events of the loop (Composer's design).

A plugin declares the events it handles and acts on the DataState only. Each family has one job:
  Mixer       -> state.domain_weights   (BEFORE_SAMPLE; learns at BATCH_END / EVAL_END)
  Selector    -> state.keep_mask        (AFTER_CANDIDATES)
  Reweighter  -> state.sample_weights   (AFTER_LOSS)
The math of every plugin also lives in a pure function beside it, testable without a loop.
"""
from __future__ import annotations

import functools
import inspect
import time
from typing import Iterable, Optional

import torch

from dataflex.core.events import Event
from dataflex.core.state import DataState


class Plugin:
    family = "plugin"
    events: tuple = ()

    @property
    def name(self) -> str:
        return type(self).__name__

    def match(self, event: Event, state: DataState) -> bool:
        return event in self.events

    def apply(self, event: Event, state: DataState) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


MIXER_APPLY = ("sample", "loss")


def domain_loss_weights(weights: torch.Tensor, sampling: torch.Tensor) -> torch.Tensor:
    """Loss weights that turn draws from `sampling` (q) into the objective of `weights` (w): w_d / q_d.

    E_{d~q}[(w_d / q_d) g_d] = sum_d w_d g_d = E_{d~w}[g_d], so in expectation the gradient equals
    the one of sampling from w. A domain with w_d = 0 weighs 0; w_d > 0 with q_d = 0 is impossible."""
    w = torch.as_tensor(weights, dtype=torch.float64)
    q = torch.as_tensor(sampling, dtype=torch.float64)
    w, q = w / w.sum(), q / q.sum()
    if ((q <= 0) & (w > 0)).any():
        raise ValueError(f"mixer.apply=loss: domains {torch.nonzero((q <= 0) & (w > 0)).flatten().tolist()} have "
                         f"weight but are never sampled (sampling distribution {q.tolist()})")
    return torch.where(w > 0, w / q.clamp(min=1e-300), torch.zeros_like(w))


class Mixer(Plugin):
    """Outputs domain weights. Subclasses implement `weights(state)` and optionally `update`.

    Every mixer takes `apply="sample" | "loss"` (`mixer.apply=...` in a config), added to its
    constructor by this class:
      sample  the sampler draws domains from the mixer's weights w (the default);
      loss    the sampler draws from a fixed distribution q (the domain sizes, what the run draws
              without a mixer) and each sample's loss is scaled by w_d / q_d through
              `state.domain_loss_weights` (DoReMi's and NeMo's domain-weighted objective); in
              expectation the gradient is the same as sampling from w (`domain_loss_weights`).
    The mixture the mixer chose is `self.mixture` and, under `loss`, logged as `mixer/weight/<domain>`
    (the run's `domain_weights` is then q).

    and `unit="token" | "sample"` (`mixer.unit=...`), what its weights are shares of:
      token   label tokens: the sampler draws domain d with probability ∝ w_d / L_d (L_d: the mean label
              tokens of a sample of domain d, `DataAwareSampler.mean_tokens`), so the expected share of
              trained tokens from d is w_d; domain sizes (weights="size", q under `apply=loss`) are
              counted in label tokens (`domain_sizes`);
      sample  samples drawn (what every mixer meant before packing);
      None    (the default) token under packing (`state.packing`), sample otherwise.
    """
    SETTINGS = {"apply": ("sample", "loss"), "unit": ("token", "sample")}
    EXTRA_PARAMETERS = {"apply": ("str", "sample"), "unit": ("Optional[str]", None)}   # added to every subclass's __init__
    family = "mixer"
    events = (Event.FIT_START, Event.BEFORE_SAMPLE, Event.BATCH_END, Event.EVAL_END)
    apply_to: str = "sample"
    unit: Optional[str] = None
    mixture: Optional[torch.Tensor] = None
    family = "mixer"
    events = (Event.FIT_START, Event.BEFORE_SAMPLE, Event.BATCH_END, Event.EVAL_END)
    apply_to: str = "sample"
    mixture: Optional[torch.Tensor] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        own = inspect.signature(init).parameters
        added = [k for k in ("apply", "unit") if k not in own]     # a subclass may take either itself
        if not added:
            return

        @functools.wraps(init)
        def __init__(self, *args, **kw):
            apply = kw.pop("apply", "sample") if "apply" in added else None
            unit = kw.pop("unit", None) if "unit" in added else None
            init(self, *args, **kw)
            if "apply" in added:
                self.apply_to = check_apply(apply)
            if "unit" in added:
                self.unit = check_unit(unit)

        cls.__init__ = __init__

    def setup(self, state: DataState) -> None:
        pass

    def weights(self, state: DataState) -> torch.Tensor:
        raise NotImplementedError

    def update(self, event: Event, state: DataState) -> None:
        pass

    def sampling_distribution(self, state: DataState) -> torch.Tensor:
        """q under apply=loss, in the mixer's unit: the domain sizes (what the sampler draws without a mixer;
        in label tokens under unit=token, which gives the same draws)."""
        q = self.domain_sizes(state)
        return q / q.sum()

    def domain_sizes(self, state: DataState) -> torch.Tensor:
        """[K] each domain's size in the mixer's unit: samples, or label tokens (samples x mean label tokens)
        under unit=token, so that weights="size" means the data eaten whole in either unit."""
        sizes = torch.tensor(state.domain_sizes, dtype=torch.float64)
        if self.weight_unit(state) == "token" and state.domain_mean_tokens is not None:
            sizes = sizes * torch.as_tensor(state.domain_mean_tokens, dtype=torch.float64)
        return sizes

    def weight_unit(self, state: DataState) -> str:
        """The unit of this mixer's weights: `unit`, or token under packing and sample otherwise."""
        return self.unit or ("token" if getattr(state, "packing", False) else "sample")

    def apply(self, event, state):
        # FIT_START sets up; an event before it (the run's evaluation before the first step) sets up first
        if event == Event.FIT_START or not getattr(self, "_set_up", False):
            self.setup(state)
            self._set_up = True
        if event == Event.FIT_START:
            return
        if event == Event.BEFORE_SAMPLE:
            w = torch.as_tensor(self.weights(state), dtype=torch.float64)
            w = w / w.sum()
            self.mixture = w
            unit = self.weight_unit(state)
            if self.apply_to == "loss":     # q and w in the same unit
                q = self.sampling_distribution(state)
                state.domain_weights, state.weight_unit = q, unit
                state.domain_loss_weights = domain_loss_weights(w, q)
                for d, name in enumerate(state.domains):
                    state.metrics[f"mixer/weight/{name}"] = float(w[d])
            else:
                state.domain_weights, state.weight_unit = w, unit
        else:
            self.update(event, state)


def check_unit(unit: Optional[str]) -> Optional[str]:
    if unit is not None and unit not in ("token", "sample"):
        raise ValueError(f"mixer.unit must be 'token' or 'sample', got {unit!r}")
    return unit


def check_apply(apply: str) -> str:
    if apply not in MIXER_APPLY:
        raise ValueError(f"mixer.apply must be 'sample' or 'loss', got {apply!r}")
    return apply


class Selector(Plugin):
    """Outputs a keep mask over a candidate batch `candidate_factor` times the global batch."""
    family = "selector"
    events = (Event.AFTER_CANDIDATES,)
    candidate_factor: float = 1.0

    def select(self, state: DataState) -> torch.Tensor:
        raise NotImplementedError

    def apply(self, event, state):
        state.keep_mask = self.select(state)


class Reweighter(Plugin):
    """Outputs per-sample weights with mean 1 over the global batch (returned by `weigh`), or token
    weights ([B, T] in state.token_weights, with `needs_token_losses = True` so that the session
    gathers state.token_losses and state.token_mask). Losses that were not finite read as the
    batch's finite mean in state.losses and get weight 0 afterwards, whatever the plugin says."""
    family = "reweighter"
    events = (Event.AFTER_LOSS,)
    needs_token_losses: bool = False

    def weigh(self, state: DataState) -> torch.Tensor:
        raise NotImplementedError

    def token_weights_of_loss(self, state: DataState):
        """When this step's `weigh` will set token weights only, each a function of its own token's loss
        (elementwise, float64 out), that function; None (the default) otherwise. Asked before the forward: the
        lean loss then forms its gradients there (`dataflex.core.lean_loss`). A hint, checked in the backward:
        a wrong answer costs a recomputation, never a wrong gradient."""
        return None

    def apply(self, event, state):
        state.sample_weights = self.weigh(state)


FAMILY_ORDER = {"mixer": 0, "selector": 1, "reweighter": 2}


class Engine:
    """Dispatches events to plugins in a fixed order and keeps a trace of what ran."""

    def __init__(self, plugins: Iterable[Plugin], state: DataState):
        self.plugins = sorted(plugins, key=lambda p: FAMILY_ORDER.get(p.family, 3))
        for family in ("mixer", "selector", "reweighter"):
            found = [p.name for p in self.plugins if p.family == family]
            if len(found) > 1:
                raise ValueError(f"one {family} per run, got {found}")
        self.state = state
        self.traces: dict[str, float] = {}

    def of(self, family: str):
        return next((p for p in self.plugins if p.family == family), None)

    def fire(self, event: Event) -> None:
        for plugin in self.plugins:
            if plugin.match(event, self.state):
                start = time.perf_counter()
                plugin.apply(event, self.state)
                key = f"{plugin.name}/{event.value}"
                self.traces[key] = self.traces.get(key, 0.0) + time.perf_counter() - start

    def state_dict(self) -> dict:
        return {"plugins": [(p.name, p.state_dict()) for p in self.plugins]}

    def load_state_dict(self, state: dict) -> None:
        saved = state["plugins"]
        names = [p.name for p in self.plugins]
        if [n for n, _ in saved] != names:
            raise ValueError(f"checkpoint holds plugins {[n for n, _ in saved]}, this run has {names}")
        for plugin, (_, sd) in zip(self.plugins, saved):
            plugin.load_state_dict(sd)
