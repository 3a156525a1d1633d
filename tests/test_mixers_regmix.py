"""RegMix (spec section 5): mixture sampling, the regression, the top-k pick, the mixture file, and (slow)
the whole offline workflow through launch/regmix.py's Hydra sweep."""
import builtins
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dataflex.core.events import Event
from dataflex.core.state import DataState
from dataflex.mixers import StaticMixer
from dataflex.mixers.regmix import (
    LinearModel,
    fit_regression,
    heldout_spearman,
    make_model,
    sample_mixtures,
    spearman,
    temperature_prior,
    top_k_mixture,
    write_mixture,
)

ROOT = Path(__file__).resolve().parents[1]
OPT = np.array([0.4, 0.3, 0.1, 0.2])
CURV = np.array([3.0, 2.0, 5.0, 1.0])


def synthetic_loss(W):
    """A smooth loss over mixtures with its optimum at OPT."""
    return 2.0 + ((W - OPT) ** 2) @ CURV


def test_temperature_prior_and_sampling_rules():
    sizes = [100, 300, 50, 550]
    prior = temperature_prior(sizes, 0.5)
    expected = np.sqrt(np.array(sizes) / 1000)
    np.testing.assert_allclose(prior, expected / expected.sum())
    X = sample_mixtures(prior, 200, seed=0)
    assert X.shape == (200, 4)
    np.testing.assert_allclose(X.sum(1), 1.0, atol=1e-12)
    assert (X >= 2e-4).all() and (X <= 15 * prior).all()
    np.testing.assert_array_equal(X, sample_mixtures(prior, 200, seed=0))
    assert not np.array_equal(X, sample_mixtures(prior, 200, seed=1))
    # a tight ratio rule rejects more but still holds
    tight = sample_mixtures(prior, 50, seed=0, max_ratio=2.0)
    assert (tight <= 2.0 * prior).all()
    # spread: the concentration s in [0.1, 5] gives both peaked and flat mixtures
    assert X.max(1).max() > 0.9 and X.max(1).min() < 0.6


def test_lightgbm_regression_ranks_held_out_mixtures_and_finds_the_optimum():
    pytest.importorskip("lightgbm")
    prior = temperature_prior([100, 300, 50, 550])
    X = sample_mixtures(prior, 256, seed=0)
    y = synthetic_loss(X) + 0.002 * np.random.default_rng(0).standard_normal(len(X))
    assert heldout_spearman(X, y, "lightgbm", folds=3) > 0.9
    model = fit_regression(X, y, "lightgbm")
    assert type(model).name == "lightgbm"
    best, predicted = top_k_mixture(model, prior, n_candidates=5000, top_k=64)
    assert np.abs(best - OPT).max() < 0.08, best
    assert abs(best.sum() - 1) < 1e-12
    assert predicted < np.quantile(y, 0.05)


def test_linear_fallback():
    prior = temperature_prior([1, 1, 1, 1])
    X = sample_mixtures(prior, 64, seed=2)
    y = 3.0 - X @ np.array([0.5, 1.0, -0.3, 0.2]) + 0.001 * np.random.default_rng(0).standard_normal(len(X))
    model = fit_regression(X, y, "linear")
    assert isinstance(model, LinearModel)
    assert spearman(model.predict(X), y) > 0.99
    assert heldout_spearman(X, y, "linear") > 0.95
    best, _ = top_k_mixture(model, prior, n_candidates=2000, top_k=16)
    assert best.argmax() == 1                            # the domain that lowers the loss most


def test_auto_model_falls_back_to_linear_without_lightgbm(monkeypatch):
    real_import = builtins.__import__

    def no_lightgbm(name, *args, **kwargs):
        if name == "lightgbm":
            raise ImportError("no lightgbm")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lightgbm)
    assert isinstance(make_model("auto"), LinearModel)
    with pytest.raises(ValueError, match="auto, lightgbm or linear"):
        make_model("xgboost")


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_mixture_file_loads_into_the_static_mixer(tmp_path, suffix):
    path = write_mixture(tmp_path / f"mixture{suffix}", ["a", "b", "c"], np.array([0.2, 0.5, 0.3]),
                         predicted_loss=1.5, model="linear")
    mixer = StaticMixer(weights=str(path))
    state = DataState(["a", "b", "c"], [1, 1, 1], 4)
    mixer.apply(Event.FIT_START, state)
    mixer.apply(Event.BEFORE_SAMPLE, state)
    torch.testing.assert_close(state.domain_weights, torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64))


@pytest.mark.slow
def test_regmix_end_to_end(tmp_path):
    """Three 2-step proxy runs through the Hydra sweep, the fit, and a mixture file a static run loads."""
    spec = importlib.util.spec_from_file_location("regmix_launch", ROOT / "launch" / "regmix.py")
    regmix = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(regmix)
    out = regmix.main(["--mixtures", "3", "--steps", "2", "--out", str(tmp_path), "--candidates", "500",
                       "--top-k", "8", "trainer.max_val_samples=4", "trainer.global_batch_size=4"])
    report = json.loads((tmp_path / "regmix.json").read_text())
    assert len(report["runs"]) == 3 and report["domains"] == ["prose", "code", "math", "noise"]
    mixtures = sorted((tmp_path / "mixtures").glob("mix_*.json"))
    assert len(mixtures) == 3
    for run in report["runs"]:
        cfg = (Path(run["dir"]) / "config.yaml").read_text()
        assert "mix_" in cfg and np.isfinite(run["loss"])
    content = json.loads(out.read_text())
    assert set(content["weights"]) == {"prose", "code", "math", "noise"}
    assert abs(sum(content["weights"].values()) - 1) < 1e-9
    mixer = StaticMixer(weights=str(out))
    state = DataState(report["domains"], [1, 1, 1, 1], 4)
    mixer.apply(Event.FIT_START, state)
