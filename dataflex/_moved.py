"""Module paths of dataflex 0.1 that moved in 0.2, kept importable for one release with a DeprecationWarning.

`import dataflex.checks` (or `from dataflex.data import SampleSet`-style imports of a moved module) finds
the new home through this finder; a module that was split is a thin module whose attributes are looked up
in its new homes, in order. docs/concepts/architecture.md lists every move."""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

# old module -> its new home(s), the first one holding most of it
MOVED = {
    "dataflex.dist": ["dataflex.utils.dist"],
    "dataflex.console": ["dataflex.utils.console"],
    "dataflex.events": ["dataflex.core.events"],
    "dataflex.state": ["dataflex.core.state"],
    "dataflex.plugin": ["dataflex.core.plugin"],
    "dataflex.registry": ["dataflex.core.registry"],
    "dataflex.targets": ["dataflex.core.targets"],
    "dataflex.sampler": ["dataflex.core.sampler"],
    "dataflex.loss": ["dataflex.core.loss"],
    "dataflex.signals": ["dataflex.session.signals"],
    "dataflex.grads": ["dataflex.grad.params", "dataflex.grad.api", "dataflex.grad.vmap", "dataflex.models.forward"],
    "dataflex.ghost": ["dataflex.grad.ghost"],
    "dataflex.factored": ["dataflex.grad.factored"],
    "dataflex.fallback": ["dataflex.grad.fallback"],
    "dataflex.projection": ["dataflex.grad.projection"],
    "dataflex.interface": ["dataflex.grad.interface", "dataflex.backends.deepspeed"],
    "dataflex.model": ["dataflex.models.tiny_gpt"],
    "dataflex.hf": ["dataflex.models.hf", "dataprep.tokenizer", "dataflex.data.config"],
    "dataflex.tokenizer": ["dataprep.tokenizer"],
    "dataflex.data_cache": ["dataflex.data.cache", "dataflex.utils.files"],
    "dataflex.shards": ["dataflex.data.shards"],
    "dataflex.mixture": ["dataflex.data.mixture"],
    "dataflex.provenance": ["dataflex.data.provenance"],
    "dataflex.embeddings": ["dataflex.selectors.embedding"],
    "dataflex.selectors.less_math": ["dataflex.selectors.less.math"],
    "dataflex.reference": ["dataflex.run.reference", "dataflex.grad.interface"],
    "dataflex.launching": ["dataflex.run.launching", "dataflex.run.config", "dataflex.run.checkpoints",
                           "dataflex.utils.errors", "dataflex.utils.dist"],
    "dataflex.outputs": ["dataflex.run.outputs"],
    "dataflex.checks": ["dataflex.run.config", "dataflex.run.checkpoints", "dataflex.run.faults",
                        "dataflex.utils.errors", "dataflex.data.shards", "dataflex.data.tokenizer",
                        "dataflex.backends.extensions"],
    "dataflex.integrations.hf": ["dataflex.integrations.hf_trainer"],
    "dataflex.backends.megatron_model": ["dataflex.backends.megatron.model"],
    "dataflex.backends.megatron_cpu": ["dataflex.backends.megatron.cpu_shim"],
    "dataflex.corpus": ["dataprep.corpora.bench"],
    "dataflex.corpus.pipeline": ["dataprep.corpora.bench.pipeline"],
    "dataflex.corpus.readers": ["dataprep.corpora.bench.readers"],
    "dataflex.corpus.sources": ["dataprep.corpora.bench.sources"],
    "dataprep.where": ["dataflex.data.provenance"],
}


def _split_module(old: str, homes: list) -> types.ModuleType:
    mod = types.ModuleType(old, f"Moved: see {', '.join(homes)}")

    def __getattr__(name):
        for home in homes:
            target = importlib.import_module(home)
            if hasattr(target, name):
                return getattr(target, name)
        raise AttributeError(f"module {old!r} has no attribute {name!r} (it moved to {', '.join(homes)})")

    mod.__getattr__ = __getattr__
    return mod


class _Loader(importlib.abc.Loader):
    def __init__(self, old: str):
        self.old = old

    def create_module(self, spec):
        homes = MOVED[self.old]
        warnings.warn(f"{self.old} moved to {homes[0]}" + (f" (and {', '.join(homes[1:])})" if homes[1:] else "")
                      + "; the old path goes away in the next release", DeprecationWarning, stacklevel=3)
        return importlib.import_module(homes[0]) if len(homes) == 1 else _split_module(self.old, homes)

    def exec_module(self, module):
        pass


class MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, _Loader(fullname))


def install() -> None:
    if not any(isinstance(f, MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, MovedFinder())      # before PathFinder: a moved package's submodules too
