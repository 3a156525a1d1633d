"""Two-step recipes through the real launcher (plain torch back end): a reference run, then Rho-1
and DoReMi against it, then a static run on DoReMi's averaged mixture."""
import json
import sys
from pathlib import Path

import pandas as pd
import pytest
from test_launch import FAST, ROOT, run

pytestmark = pytest.mark.slow
TRAIN = [sys.executable, str(ROOT / "launch" / "train.py"), "backend=torch", "logger=none", "trainer.plot=false", *FAST]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref"
    run([*TRAIN, "+mixer=static", "mixer.weights=uniform", "trainer.checkpoint_every=6", f"hydra.run.dir={out}"])
    assert (out / "checkpoints" / "step_0000006" / "state.pt").exists()
    return out


def metrics(run_dir: Path):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"train_loss"' in x]


def test_rho1_trains_on_the_top_tokens_by_excess_loss_over_a_reference_run(reference, tmp_path):
    out = tmp_path / "rho1"
    run([*TRAIN, "+reweighter=rho1", f"reweighter.reference={reference}", "reweighter.keep_fraction=0.7",
         f"hydra.run.dir={out}"])
    steps = metrics(out)
    assert len(steps) == 6
    assert all(abs(x["reweighter/kept_fraction"] - 0.7) < 0.01 for x in steps)
    assert all(x["reweighter/reference_loss"] > 0 for x in steps)


def test_doremi_recipe_reference_proxy_then_static_mixture(reference, tmp_path):
    proxy = tmp_path / "proxy"
    run([*TRAIN, "+mixer=doremi", f"mixer.reference={reference}", f"hydra.run.dir={proxy}"])
    mixture = json.loads((proxy / "mixture.json").read_text())
    assert set(mixture) == {"prose", "code", "math", "noise"} and abs(sum(mixture.values()) - 1) < 1e-9
    steps = metrics(proxy)
    assert all("doremi/excess/noise" in x for x in steps)
    # draws follow alpha_ref (uniform); the learnt weights act on the loss
    assert all(abs(w - 0.25) < 1e-12 for x in steps for w in x["domain_weights"].values())
    final = tmp_path / "final"
    run([*TRAIN, "+mixer=static", f"mixer.weights={proxy / 'mixture.json'}", f"hydra.run.dir={final}"])
    used = metrics(final)[0]["domain_weights"]
    assert used == pytest.approx(mixture, abs=1e-9)
    ledger = pd.read_parquet(final / "ledger")
    assert ledger.groupby("step")["row"].nunique().tolist() == [8] * 6     # packed: 8 rows a step, all used
