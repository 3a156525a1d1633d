"""Mixers output domain weights."""
from ..registry import Registry
from .bandit import BanditMixer, exp3_policy, exp3_update, exploration_rate
from .static import StaticMixer, resolve_weights

MIXERS = Registry("mixer", {"static": StaticMixer, "bandit": BanditMixer})

__all__ = ["MIXERS", "BanditMixer", "StaticMixer", "exp3_policy", "exp3_update", "exploration_rate",
           "resolve_weights"]
