"""The session that binds data, model and plugins: `DataFlex` (the sampler, the loss wrapper and the plugin
engine at each step) and `Signals` (the one interface plugins see). Imports `core`, `grad`, `data`, `utils`."""
from dataflex.session.flex import DataFlex
from dataflex.session.signals import Signals

__all__ = ["DataFlex", "Signals"]
