"""Mixers output domain weights: one algorithm per file, each with its pure functions.

`+mixer=NAME` in a config; `MIXERS.build(NAME, **kwargs)` from Python. Every mixer takes
`apply="sample" | "loss"` (dataflex.core.plugin.Mixer)."""
from dataflex.core.plugin import Mixer, domain_loss_weights
from dataflex.core.registry import Registry
from dataflex.mixers.ado import ADOMixer, ado_preference, ado_smooth, clip_min_probability, fit_power_law, power_law
from dataflex.mixers.aioli import AioliMixer, aioli_eg_step, aioli_mixtures, aioli_normalize, aioli_unmix
from dataflex.mixers.bandit import BanditMixer, exp3_estimate, exp3_policy, exp3_update, exploration_rate
from dataflex.mixers.doremi import DoReMiMixer, doremi_update, excess_loss
from dataflex.mixers.sheared import ShearedMixer, read_reference, sheared_update
from dataflex.mixers.static import StaticMixer, load_mixture_file, resolve_weights, temperature_weights

MIXERS = Registry("mixer", {"static": StaticMixer, "bandit": BanditMixer, "doremi": DoReMiMixer, "aioli": AioliMixer,
                            "ado": ADOMixer, "sheared": ShearedMixer})

__all__ = ["MIXERS", "Mixer", "ADOMixer", "AioliMixer", "BanditMixer", "DoReMiMixer", "ShearedMixer", "StaticMixer",
           "ado_preference", "ado_smooth", "aioli_eg_step", "aioli_mixtures", "aioli_normalize", "aioli_unmix",
           "clip_min_probability", "domain_loss_weights", "doremi_update", "excess_loss", "exp3_estimate",
           "exp3_policy", "exp3_update", "exploration_rate", "fit_power_law", "load_mixture_file", "power_law",
           "read_reference", "resolve_weights", "sheared_update", "temperature_weights"]
