"""Typed plugin settings (dataflex.core.settings): every mixer, selector and reweighter setting is checked by
type and range before any data is read, with one `train: error: KEY=VALUE: expected ...` line and exit 2."""
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from test_launch import ROOT

from dataflex.core.settings import check_settings
from dataflex.mixers import BanditMixer, StaticMixer
from dataflex.run.plugins import check_plugin_settings
from dataflex.utils.errors import ConfigError

CONFIGS = ROOT / "configs"


def composed(*overrides):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return compose("train", overrides=list(overrides), return_hydra_config=False)


WRONG = [   # (overrides, the line's start, what it says is allowed): one per family at least
    (["+mixer=bandit", "mixer.alpha=abc"], "mixer.alpha=abc", "a number in (0, 1]"),
    (["+mixer=bandit", "mixer.alpha=-1"], "mixer.alpha=-1", "a number in (0, 1]"),
    (["+mixer=bandit", "mixer.reward_scale=-15"], "mixer.reward_scale=-15", "a number > 0"),
    (["+mixer=static", "mixer.weights=unifrom"], "mixer.weights=unifrom", "did you mean 'uniform'?"),
    (["+mixer=static", "+mixer.weights={a: 0, b: 0}"], "mixer.weights={a: 0, b: 0}", "a positive sum"),
    (["+mixer=ado", "mixer.gamma=1.5"], "mixer.gamma=1.5", "a number in [0, 1)"),
    (["+mixer=aioli", "mixer.eta=-1"], "mixer.eta=-1", "a number > 0"),
    (["+mixer=sheared", "mixer.smoothing=2"], "mixer.smoothing=2", "a number in [0, 1)"),
    (["+mixer=bandit", "mixer.variant=papr"], "mixer.variant=papr", "one of paper, cumulative"),
    (["+mixer=bandit", "mixer.apply=los"], "mixer.apply=los", "one of sample, loss"),
    (["+selector=loss", "selector.keep_fraction=1.5"], "selector.keep_fraction=1.5", "a number in (0, 1]"),
    (["+selector=random", "selector.scope=everything"], "selector.scope=everything", "one of batch, pool"),
    (["+selector=less", "selector.dim=0"], "selector.dim=0", "an integer >= 1"),
    (["+selector=tracin", "selector.refresh_every=2.5"], "selector.refresh_every=2.5", "an integer >= 1"),
    (["+reweighter=loss", "reweighter.burnout_steps=-3"], "reweighter.burnout_steps=-3", "an integer >= 0"),
    (["+reweighter=focal", "reweighter.gamma=abc"], "reweighter.gamma=abc", "a number >= 0"),
    (["+reweighter=tilted", "reweighter.t=yes"], "reweighter.t=yes", "a number"),
]


@pytest.mark.parametrize("overrides,key,allowed", WRONG, ids=[w[1] for w in WRONG])
def test_a_wrong_setting_names_key_value_and_what_is_allowed(overrides, key, allowed):
    with pytest.raises(ConfigError) as e:
        check_plugin_settings(composed(*overrides))
    assert str(e.value).startswith(f"{key}: expected ") and allowed in str(e.value), str(e.value)


def test_an_unknown_setting_suggests_the_right_one():
    with pytest.raises(ConfigError, match=r"mixer\.alhpa: BanditMixer has no such setting \(did you mean mixer\.alpha\?\)"):
        check_plugin_settings(composed("+mixer=bandit", "+mixer.alhpa=0.5"))


@pytest.mark.parametrize("group", ["mixer", "selector", "reweighter"])
def test_every_shipped_config_passes(group):
    for path in sorted((CONFIGS / group).glob("*.yaml")):
        cfg = composed(f"+{group}={path.stem}")
        if "???" in path.read_text():      # a reference run to name: refused while missing, accepted once named
            with pytest.raises(ConfigError, match=rf"{group}\.reference: missing"):
                check_plugin_settings(cfg)
            cfg = composed(f"+{group}={path.stem}", f"{group}.reference=outputs/earlier_run")
        check_plugin_settings(cfg)


def test_right_values_of_every_kind_pass():
    check_settings(BanditMixer, {"alpha": 1, "estimator": None, "min_prob": 0.01, "apply": "loss"}, "mixer")
    check_settings(StaticMixer, {"weights": {"a": 1, "b": 0}, "temperature": 0.5}, "mixer")
    check_settings(StaticMixer, {"weights": [1, 2, 3]}, "mixer")
    check_settings(StaticMixer, {"weights": "outputs/regmix/mixture.json"}, "mixer")


def test_booleans_are_not_numbers_and_numbers_not_booleans():
    with pytest.raises(ConfigError, match="mixer.alpha=true: expected a number"):
        check_settings(BanditMixer, {"alpha": True}, "mixer")


@pytest.mark.parametrize("override,line", [
    ("mixer.alpha=abc", "train: error: mixer.alpha=abc: expected a number in (0, 1]"),
    ("mixer.weights=unifrom", "train: error: mixer.weights=unifrom: expected uniform, size"),
])
def test_train_stops_before_reading_data_with_one_line_and_exit_2(override, line, tmp_path):
    mixer = "+mixer=static" if "weights" in override else "+mixer=bandit"
    cache = tmp_path / "cache"
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "backend=torch", "logger=none", mixer,
                           override, f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True,
                          env={**__import__("os").environ, "DATAFLEX_CACHE": str(cache)}, cwd=tmp_path)
    errors = [x for x in proc.stderr.splitlines() if x.startswith("train: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and errors[0].startswith(line), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not cache.exists(), "data was read before the settings were checked"
    assert not (tmp_path / "run").exists(), "a failed run leaves no folder"
