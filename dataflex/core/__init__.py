"""The loop contract, as Composer's core: the events of a training step (`events`: its docstring is the
loop), the state plugins read and write (`state`), the plugin families and the engine that runs them in
order (`plugin`), name registries, the data-aware sampler, the target set and the per-sample loss.
core imports only `dataflex.utils`."""
from dataflex.core.events import Event
from dataflex.core.loss import LossWrapper, per_sample_loss, per_token_loss
from dataflex.core.plugin import Engine, Mixer, Plugin, Reweighter, Selector
from dataflex.core.sampler import DataAwareSampler
from dataflex.core.state import DataState

__all__ = ["DataAwareSampler", "DataState", "Engine", "Event", "LossWrapper", "Mixer", "Plugin", "Reweighter",
           "Selector", "per_sample_loss", "per_token_loss"]
