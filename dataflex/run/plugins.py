"""The plugin groups of a run checked before it trains: every setting by type and range before any data is read
(`check_plugin_settings`), each plugin built with its errors as one line (`instantiate_plugin`), and what a plugin
needs (a target, a reference run) checked before the first step (`check_plugin_needs`)."""
from __future__ import annotations

import importlib
import os

from dataflex.core.settings import check_settings
from dataflex.utils.errors import ConfigError

PLUGIN_GROUPS = ("mixer", "selector", "reweighter")


def plugin_class(group: str, target: str):
    """The class a plugin group's `_target_` names (a dotted path; a name, never code)."""
    module, _, name = str(target).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name) if module else None
    except (ImportError, AttributeError):
        cls = None
    if not isinstance(cls, type):
        raise ConfigError(f"{group}._target_={target}: not a plugin class (module.Class)")
    return cls


def _resolved(node) -> dict:
    """The group's keys with interpolations resolved; a key whose interpolation needs a running Hydra job
    (`${hydra:runtime.output_dir}`) when there is none is left out: it is a path the config made, not a typo."""
    from omegaconf import OmegaConf
    from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

    out = {}
    for key in node:
        if OmegaConf.is_missing(node, key):
            raise ConfigError(f"{node._get_full_key(key)}: missing (??? in its config); give it on the command line: "
                              f"{node._get_full_key(key)}=VALUE")
        try:
            value = node[key]
            out[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        except (InterpolationResolutionError, MissingMandatoryValue):
            continue
    return out


def check_plugin_settings(cfg, groups=PLUGIN_GROUPS) -> None:
    """Every setting of the mixer, selector and reweighter in `cfg` by type and range (dataflex.core.settings),
    before any data is read: one `train: error:` line for the first wrong one."""
    from omegaconf import OmegaConf

    for group in groups:
        node = cfg.get(group) if hasattr(cfg, "get") else None
        if not node:
            continue
        given = _resolved(node) if OmegaConf.is_config(node) else dict(node)
        if "_target_" not in given:
            raise ConfigError(f"{group}: no _target_ (a plugin class, e.g. +{group}=NAME)")
        check_settings(plugin_class(group, given["_target_"]), given, group)


def check_plugin_needs(groups: list, plugins: list, domains: list, datasets: dict) -> None:
    """Before the first step (and so even for a run that ends inside a plugin's warm-up): every target a plugin
    aims at (`target`, the anchor's `anchor`) is a domain or a dataset the run has (the data config's `target`,
    `val`), and every reference run (`reference=RUN_DIR` of doremi, rho, rho1) holds a checkpoint."""
    for group, plugin in zip(groups, plugins):
        for attr in ("target", "anchor"):
            if attr == "target" and getattr(plugin, "selection", None):     # LESS trains on a given selection:
                continue                                                    # it never reads its target
            specs = getattr(plugin, attr, None)
            specs = [specs] if isinstance(specs, str) else specs if isinstance(specs, (list, tuple)) else []
            for spec in specs:
                if not isinstance(spec, str) or spec in domains or datasets.get(spec) is not None:
                    continue
                if spec == "target":
                    raise ConfigError(f"{group}.{attr}=target: the data config has no target set (`target: {{val: "
                                      f"PATH}}` or `target: {{TASK: PATH}}`); or aim at a domain: {group}.{attr}=DOMAIN "
                                      f"(domains: {', '.join(domains)})")
                if spec == "val":
                    raise ConfigError(f"{group}.{attr}=val: the run has no validation set (no domain has `val` files)"
                                      f" and no domain named 'val' (domains: {', '.join(domains)})")
                import difflib

                close = difflib.get_close_matches(spec, list(domains), n=1)
                raise ConfigError(f"{group}.{attr}={spec}: the data config has no target set and no domain named "
                                  f"{spec!r} (domains: {', '.join(domains)}"
                                  + (f"; did you mean {close[0]!r}?" if close else "") + ")")
        spec = getattr(plugin, "reference_spec", None)
        if isinstance(spec, (str, os.PathLike)) and getattr(plugin, "reference", "") is None:
            from dataflex.run.reference import find_checkpoint

            try:
                find_checkpoint(spec)
            except FileNotFoundError as e:
                raise ConfigError(f"{group}.reference={spec}: {e}") from None


def instantiate_plugin(group: str, node):
    """A plugin built from its config group; a ValueError its constructor raises over its settings (sheared
    given neither reference) is the user's to fix: one `train: error: GROUP: ...` line, not Hydra's block."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, ValueError):
            raise ConfigError(f"{group}: {cause}") from None
        raise
