"""dataflex: data that takes part in training.

One interface between model and data (per-sample loss, per-sample gradients, probes), a
data-aware sampler, a loss wrapper, and three plugin families that use only that interface:
selectors (keep masks), mixers (domain weights) and reweighters (per-sample weights).

The packages, lowest first (a test enforces that none imports one above it):

    utils      leaves: process groups, errors, console, file locks
    core       the loop contract: events, state, plugins and their engine, sampler, loss
    models     TinyGPT, Hugging Face models, the forward convention
    grad       the gradient engine and the signal interface (TorchInterface)
    data       data config -> shards -> domains -> the training mixture, provenance
    session    DataFlex (one step: draw, run plugins, weigh the loss) and Signals
    mixers, selectors, reweighters    the plugins: one algorithm a file
    backends   torch, DeepSpeed, Megatron-core
    run        run folders, launching, checkpoints, reference runs (what launch/ needs)
    integrations, report              HF Trainer / TRL; the results page

Names below are imported on first use, so `import dataflex` stays cheap.
"""
from __future__ import annotations

import importlib

from dataflex import _moved

_moved.install()

from dataflex.utils.version import __version__  # noqa: E402,F401

_PUBLIC = {
    "DataAwareSampler": "dataflex.core.sampler", "DataState": "dataflex.core.state", "Event": "dataflex.core.events",
    "Engine": "dataflex.core.plugin", "Mixer": "dataflex.core.plugin", "Plugin": "dataflex.core.plugin",
    "Reweighter": "dataflex.core.plugin", "Selector": "dataflex.core.plugin",
    "LossWrapper": "dataflex.core.loss", "per_sample_loss": "dataflex.core.loss", "per_token_loss": "dataflex.core.loss",
    "DataFlex": "dataflex.session.flex", "Signals": "dataflex.session.signals",
    "Domains": "dataflex.data.domains", "load_domains": "dataflex.data.domains",
    "MixtureDataset": "dataflex.data.mixture", "SampleSet": "dataflex.data.samples",
    "load_tokenizer": "dataprep.tokenizer",
    "FactoredProjector": "dataflex.grad.factored", "RademacherProjector": "dataflex.grad.projection",
    "SparseProjector": "dataflex.grad.projection", "batch_grad": "dataflex.grad.ghost",
    "per_sample_grad_dots": "dataflex.grad.ghost", "per_sample_grad_norms": "dataflex.grad.ghost",
    "PerSampleGrads": "dataflex.grad.params", "select_params": "dataflex.grad.params",
    "per_sample_grads": "dataflex.grad.api", "TorchInterface": "dataflex.grad.interface",
    "DeepSpeedInterface": "dataflex.backends.deepspeed",
}
_SUBPACKAGES = ("mixers", "selectors", "reweighters", "backends", "data", "grad", "core", "models", "run", "session",
                "utils", "report", "integrations")

__all__ = sorted(_PUBLIC) + ["mixers", "reweighters", "selectors"]


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
    elif name in _SUBPACKAGES or f"dataflex.{name}" in _moved.MOVED:    # old module paths: a warning
        value = importlib.import_module(f"dataflex.{name}")
    else:
        raise AttributeError(f"module 'dataflex' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC) | set(_SUBPACKAGES))
