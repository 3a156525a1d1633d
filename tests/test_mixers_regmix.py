"""RegMix (spec section 5): mixture sampling against a transcription of the reference code
(sail-sg/regmix, `mixture_config/synthesize_mixture.py` and `regression_fitting/regression.ipynb`) at
its own 17-domain Pile prior, the regression, the held-out Spearman gate, the top-k pick, the mixture
file, launch/regmix.py at 17 domains with fabricated proxy losses, and (slow) the whole offline workflow
through its Hydra sweep."""
import builtins
import importlib.util
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from dataflex.core.events import Event
from dataflex.core.state import DataState
from dataflex.mixers import StaticMixer
from dataflex.mixers.regmix import (
    LinearModel,
    candidate_mixtures,
    concentration_grid,
    deduplicate,
    dirichlet_draws,
    fit_regression,
    heldout_spearman,
    make_model,
    regmix_filter,
    regression_problem,
    sample_mixtures,
    spearman,
    temperature_prior,
    top_k_mixture,
    write_mixture,
)

ROOT = Path(__file__).resolve().parents[1]
OPT = np.array([0.4, 0.3, 0.1, 0.2])
CURV = np.array([3.0, 2.0, 5.0, 1.0])

# the reference's 17-domain Pile token distribution (synthesize_mixture.py, get_token_distribution)
PILE = {"arxiv": 0.113285273, "freelaw": 0.079608651, "nih_exporter": 0.003913491,
        "pubmed_central": 0.185375901, "wikipedia_en": 0.051081359, "dm_mathematics": 0.015962925,
        "github": 0.101750772, "philpapers": 0.003707518, "stackexchange": 0.066529351,
        "enron_emails": 0.001750772, "gutenberg_pg_19": 0.027085479, "pile_cc": 0.236869207,
        "ubuntu_irc": 0.01184346, "europarl": 0.007929969, "hackernews": 0.008032956,
        "pubmed_abstracts": 0.038825953, "uspto_backgrounds": 0.046446962}
SHARES = np.array(list(PILE.values())) / sum(PILE.values())


# -- a transcription of the reference's sampler (written from reading it, not copied) ----------------

def ref_keep(sample, raw_shares, minimum=2e-4, max_usage=15):
    """One candidate through the reference's loop body: None if rejected by the bound on the RAW share,
    else the candidate with weights below `minimum` zeroed, renormalised and rounded to `minimum`."""
    bound = [(0.0, min(p * max_usage, 1.0)) for p in raw_shares]
    for j in range(len(sample)):
        if sample[j] < bound[j][0] or sample[j] > bound[j][1]:
            return None
    s = np.where(sample[None] < minimum, 0.0, sample[None])
    s = s / np.sum(s, axis=1).reshape(-1, 1)
    return (np.round(s / minimum) * minimum)[0]


def ref_generate(raw_shares, num_samples, seed, minimum=2e-4, multiplier=100, select=True):
    """generate_weights_dirichlet with temperature 0.5 and the reference's constants, its global random
    state replaced by seeded RandomState/Random. (accepted rows [before dedup] or the num_samples picked,
    acceptance rate)."""
    nprng, pyrng = np.random.RandomState(seed), random.Random(seed)
    prior = np.asarray(raw_shares, dtype=np.float64) / np.sum(raw_shares)
    raw = prior.copy()
    prior = prior ** 0.5
    prior = prior / prior.sum()
    strengths = np.logspace(np.log10(0.1), np.log10(5.0), 15)
    final, tries = [], num_samples * multiplier
    for _ in range(tries):
        sample = pyrng.choice([nprng.dirichlet(prior * c, 1) for c in strengths])[0]
        kept = ref_keep(sample, raw, minimum)
        if kept is not None:
            final.append(kept)
    rate = len(final) / tries
    if not select:
        return np.array(final), rate
    arr = np.array(final)
    arr = arr[np.lexsort(arr.T)]
    unique = [arr[0]]
    for row in arr[1:]:
        if np.sum(np.abs(row - unique[-1])) > 1e-5:
            unique.append(row)
    return np.stack(pyrng.sample(unique, num_samples)), rate


# -- the sampler --------------------------------------------------------------------------------------

def test_the_filter_equals_the_reference_rules_on_fixed_candidates_at_17_domains():
    """Fixed Dirichlet draws at several concentrations: accepted mask and post-processed mixtures equal
    the reference loop body's, bit for bit. Among them are candidates a tempered-share bound would
    treat otherwise and candidates with weights below 2e-4 that the old rule rejected."""
    rng = np.random.default_rng(7)
    tempered = temperature_prior(SHARES)
    raw = np.concatenate([rng.dirichlet(tempered * c, size=400) for c in (0.1, 0.5, 1.0, 5.0)])
    ok, kept = regmix_filter(raw, SHARES)
    expected = [ref_keep(row, SHARES) for row in raw]
    assert ok.tolist() == [e is not None for e in expected]
    np.testing.assert_array_equal(kept, np.stack([e for e in expected if e is not None]))
    # the cases that tell the reference's rules from dataflex's old ones are really there
    tempered_ok = (raw <= np.minimum(15 * tempered, 1)[None]).all(1)
    assert (tempered_ok & ~ok).sum() > 50
    assert ((raw < 2e-4).any(1) & ok).sum() > 100
    assert (kept == 0).any(1).mean() > 0.5
    nonzero = kept[kept > 0]
    assert nonzero.min() >= 2e-4 - 1e-15
    np.testing.assert_allclose(nonzero / 2e-4, np.round(nonzero / 2e-4), atol=1e-9)


def test_concentrations_are_the_reference_grid_and_each_draw_is_dirichlet():
    grid = concentration_grid()
    np.testing.assert_allclose(grid, np.logspace(np.log10(0.1), np.log10(5.0), 15), rtol=1e-15)
    prior = temperature_prior(SHARES)
    raw, c = dirichlet_draws(prior, grid, 30_000, np.random.default_rng(0))
    np.testing.assert_allclose(raw.sum(1), 1.0, atol=1e-12)
    assert set(np.unique(c)) == set(grid)
    freq = np.array([(c == v).mean() for v in grid])
    assert np.abs(freq - 1 / 15).max() < 0.01                      # uniform over the 15 values
    # Dirichlet(c p): mean p, Var(w_k) = p_k (1 - p_k) / (c + 1), checked at both ends of the grid
    k = int(prior.argmax())
    for v in (grid[0], grid[-1]):
        w = raw[c == v][:, k]
        assert abs(w.mean() - prior[k]) < 4 * np.sqrt(prior[k] * (1 - prior[k]) / (v + 1) / len(w))
        assert w.var() == pytest.approx(prior[k] * (1 - prior[k]) / (v + 1), rel=0.1)


def test_sampling_matches_a_transcription_of_the_reference_at_17_domains():
    """Same law as the reference at its own Pile prior: acceptance rate, share of zeroed weights and the
    mean mixture of accepted candidates agree with the transcription's (dataflex's old rules accepted
    0.036% and zeroed none)."""
    ref, ref_rate = ref_generate(SHARES, 100, seed=0, select=False)
    raw, _ = dirichlet_draws(temperature_prior(SHARES), concentration_grid(), 10_000, np.random.default_rng(1))
    ok, ours = regmix_filter(raw, SHARES)
    assert 0.4 < ref_rate < 0.75
    assert abs(ok.mean() - ref_rate) < 0.03
    assert abs((ours == 0).mean() - (ref == 0).mean()) < 0.03
    np.testing.assert_allclose(ours.mean(0), ref.mean(0), atol=0.02)


def test_sample_mixtures_works_at_17_domains_with_the_pile_prior():
    X = sample_mixtures(SHARES, 512, seed=0)
    assert X.shape == (512, 17)
    assert len(deduplicate(X)) == 512                                   # distinct mixtures
    np.testing.assert_allclose(X.sum(1), 1.0, atol=17 * 1e-4)           # rounded to multiples of 2e-4
    assert (X == 0).any(1).mean() > 0.5                                 # weights below 2e-4 are zeroed
    assert X[X > 0].min() >= 2e-4 - 1e-15
    # the 15x bound holds on the raw share, up to the renormalisation after zeroing and the rounding
    assert (X <= np.minimum(15 * SHARES, 1)[None] / (1 - 17 * 2e-4) + 1e-4).all()
    assert (X.max(0) > 5 * SHARES).sum() >= 10                          # it does explore away from the prior
    np.testing.assert_array_equal(X, sample_mixtures(SHARES, 512, seed=0))
    assert not np.array_equal(X, sample_mixtures(SHARES, 512, seed=1))
    # the reference's whole pipeline (dedup, then a draw of num_samples) gives the same zero share
    ref, _ = ref_generate(SHARES, 128, seed=0)
    assert abs((X == 0).mean() - (ref == 0).mean()) < 0.06


def test_the_only_rejection_rule_is_named_when_too_few_mixtures_survive():
    with pytest.raises(RuntimeError, match=r"within the bound w_i <= 1.01 x raw share_i") as err:
        sample_mixtures(SHARES, 16, seed=0, max_usage=1.01, max_rounds=2)
    assert "%" in str(err.value) and "minimum" not in str(err.value)


def test_deduplicate_drops_rows_within_1e_5_in_l1():
    X = np.array([[0.5, 0.5, 0.0], [0.5 + 4e-6, 0.5 - 4e-6, 0.0], [0.2, 0.3, 0.5], [0.5, 0.5, 0.0]])
    out = deduplicate(X)
    assert len(out) == 2 and {tuple(np.round(r, 3)) for r in out} == {(0.5, 0.5, 0.0), (0.2, 0.3, 0.5)}


def test_prediction_candidates_are_plain_dirichlet_of_the_raw_shares():
    """regression.ipynb: np.random.dirichlet(prior_dist * 1, 100000) on the raw shares, no bound, no
    rounding; the result is the plain mean of the top-k by prediction."""
    C = candidate_mixtures(SHARES, 50_000, seed=3)
    ref = np.random.RandomState(42).dirichlet(SHARES * 1, 50_000)
    k = int(SHARES.argmax())
    for sample in (C, ref):                                       # mean s, Var = s (1 - s) / 2
        np.testing.assert_allclose(sample.mean(0), SHARES, atol=0.01)
        assert sample[:, k].var() == pytest.approx(SHARES[k] * (1 - SHARES[k]) / 2, rel=0.05)
    assert (C > 15 * SHARES[None]).any()                              # no bound on the candidates
    model = LinearModel()
    model.coef = np.concatenate([np.linspace(-1, 1, 17), [2.0]])
    best, predicted = top_k_mixture(model, SHARES, n_candidates=5000, top_k=128, seed=2)
    cand = candidate_mixtures(SHARES, 5000, seed=3)
    top = cand[np.argsort(model.predict(cand))[:128]].mean(0)          # the notebook's last cell
    np.testing.assert_array_equal(best, top)
    assert predicted == pytest.approx(float(model.predict(top[None])[0]))


def test_temperature_prior():
    sizes = [100, 300, 50, 550]
    expected = np.sqrt(np.array(sizes) / 1000)
    np.testing.assert_allclose(temperature_prior(sizes, 0.5), expected / expected.sum())
    with pytest.raises(ValueError, match="non-negative domain sizes"):
        temperature_prior([1.0])


def test_regression_problem_refuses_what_does_not_rank_held_out_runs():
    assert regression_problem(0.8) is None and regression_problem(0.31) is None
    assert "-0.370" in regression_problem(-0.37) and "worse than" in regression_problem(-0.37)
    assert "0.120" in regression_problem(0.12) and "barely better" in regression_problem(0.12)
    assert "cannot be measured" in regression_problem(None)
    assert "undefined" in regression_problem(float("nan"))
    assert regression_problem(0.12, min_spearman=0.1) is None


def synthetic_loss(W):
    """A smooth loss over mixtures with its optimum at OPT."""
    return 2.0 + ((W - OPT) ** 2) @ CURV


def test_lightgbm_regression_ranks_held_out_mixtures_and_finds_a_better_mixture():
    """Four domains, a known optimum: held-out Spearman > 0.9; the mean of the top 64 of the plain
    Dirichlet(shares) candidates is nearer the optimum than the prior and predicted better than 95% of
    the proxy runs."""
    sizes = [100, 300, 50, 550]
    X = sample_mixtures(sizes, 256, seed=0)
    y = synthetic_loss(X) + 0.002 * np.random.default_rng(0).standard_normal(len(X))
    assert heldout_spearman(X, y, "lightgbm", folds=3) > 0.9
    model = fit_regression(X, y, "lightgbm")
    assert type(model).name == "lightgbm"
    best, predicted = top_k_mixture(model, sizes, n_candidates=20_000, top_k=64)
    shares = np.array(sizes) / sum(sizes)
    assert np.abs(best - OPT).sum() < 0.5 * np.abs(shares - OPT).sum(), best
    assert abs(best.sum() - 1) < 1e-12
    assert predicted < np.quantile(y, 0.05)
    assert synthetic_loss(best[None])[0] < synthetic_loss(shares[None])[0]


def test_linear_fallback():
    sizes = [1, 1, 1, 1]
    X = sample_mixtures(sizes, 64, seed=2)
    y = 3.0 - X @ np.array([0.5, 1.0, -0.3, 0.2]) + 0.001 * np.random.default_rng(0).standard_normal(len(X))
    model = fit_regression(X, y, "linear")
    assert isinstance(model, LinearModel)
    assert spearman(model.predict(X), y) > 0.99
    assert heldout_spearman(X, y, "linear") > 0.95
    best, _ = top_k_mixture(model, sizes, n_candidates=2000, top_k=16)
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


def load_launch():
    """The regmix recipe (launch/regmix.py runs it), fresh, so monkeypatching stays inside one test."""
    import dataflex.recipes.regmix as recipe
    return importlib.reload(recipe)


def fake_pile_launch(monkeypatch, regmix, loss_of):
    """launch/regmix.py on the 17 Pile domains (token shares x 1e6 as sizes), each proxy run replaced by
    a summary whose validation loss is loss_of(mixture)."""
    names = list(PILE)
    monkeypatch.setattr(regmix, "domain_sizes", lambda overrides, config_dir: (names, [round(v * 1e6) for v in
                                                                                       PILE.values()]))

    def run_sweep(files, args, overrides):
        for i, f in enumerate(files):
            run = args.out / "sweep" / str(i)
            run.mkdir(parents=True)
            (run / "config.yaml").write_text(json.dumps({"mixer": {"weights": str(f)}}))
            w = np.array([json.loads(Path(f).read_text())["weights"][d] for d in names])
            (run / "summary.json").write_text(json.dumps({"val_loss": {"pile_cc": float(loss_of(w))}}))

    monkeypatch.setattr(regmix, "run_sweep", run_sweep)
    return names


def test_launch_writes_a_mixture_at_17_domains_when_the_fit_ranks_held_out_runs(tmp_path, monkeypatch, capsys):
    regmix = load_launch()
    coef = np.linspace(0.5, -0.5, 17)
    noise = np.random.default_rng(0)
    names = fake_pile_launch(monkeypatch, regmix, lambda w: 4.0 + w @ coef + 0.01 * noise.standard_normal())
    out = regmix.main(["--mixtures", "64", "--out", str(tmp_path), "--model", "linear", "--candidates", "5000",
                       "--target", "pile_cc"])
    content = json.loads(out.read_text())
    assert list(content["weights"]) == names and content["heldout_spearman"] > 0.9 and "warning" not in content
    w = np.array(list(content["weights"].values()))
    assert abs(w.sum() - 1) < 1e-9 and w.argmax() == int(np.argmin(coef))   # the domain that lowers the loss
    report = json.loads((tmp_path / "regmix.json").read_text())
    assert len(report["runs"]) == 64 and report["problem"] is None
    assert "held-out Spearman" in capsys.readouterr().out


def test_launch_refuses_a_regression_that_ranks_worse_than_chance(tmp_path, monkeypatch, capsys):
    regmix = load_launch()
    noise = np.random.default_rng(1)
    fake_pile_launch(monkeypatch, regmix, lambda w: 4.0 + 0.1 * noise.standard_normal())   # no signal
    args = ["--mixtures", "32", "--out", str(tmp_path), "--model", "linear", "--candidates", "2000",
            "--target", "pile_cc"]
    with pytest.raises(SystemExit, match=r"NO MIXTURE WRITTEN: the regression's held-out Spearman rank "
                                         r"correlation is -?\d\.\d{3}, below 0.3"):
        regmix.main(args)
    report = json.loads((tmp_path / "regmix.json").read_text())
    assert report["heldout_spearman"] < 0.3 and not (tmp_path / "mixture.json").exists()
    out = regmix.main(args + ["--reuse", "--force"])                       # written, with the warning
    assert "WARNING" in capsys.readouterr().err
    content = json.loads(out.read_text())
    assert f"{report['heldout_spearman']:.3f}" in content["warning"]


@pytest.mark.slow
def test_regmix_end_to_end(tmp_path):
    """Three 2-step proxy runs through the Hydra sweep, the fit, and a mixture file a static run loads
    (--force: three runs are too few to measure a held-out Spearman)."""
    regmix = load_launch()
    out = regmix.main(["--mixtures", "3", "--steps", "2", "--out", str(tmp_path), "--candidates", "500",
                       "--top-k", "8", "--force", "trainer.max_val_samples=4", "trainer.global_batch_size=4"])
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
