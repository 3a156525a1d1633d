"""LESS (spec section 1 (e)): the Adam feature, projections, cosine vs dot, max over subtasks, the
toy-corpus selection, exact resume, and the one-command recipe through launch/train.py."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import roundtrip, step, synthetic_domains, tiny_gpt

from dataflex.core.sampler import DataAwareSampler
from dataflex.data.domains import MixtureDataset
from dataflex.grad.api import per_sample_grads
from dataflex.grad.interface import TorchInterface
from dataflex.grad.params import select_params
from dataflex.grad.projection import RademacherProjector, SparseProjector
from dataflex.selectors import LessSelector, RandomSelector, adam_feature, less_scores
from dataflex.selectors.less.math import aggregate, checkpoint_weights, l2_normalize, top_fraction
from dataflex.session.flex import DataFlex

BETAS = (0.9, 0.95)          # backends.make_optimizer's


pytestmark = pytest.mark.usefixtures("one_thread")


def make_run(plugin, n=48, val_n=8, lora=4, lr=3e-3, batch=8, seed=0, **kw):
    model = tiny_gpt(lora_rank=lora)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=BETAS)
    val = MixtureDataset(synthetic_domains(n_per_domain=val_n, seed=1))
    flex = DataFlex(synthetic_domains(n_per_domain=n), global_batch_size=batch, plugins=[plugin],
                    interface=TorchInterface(model), seed=seed, datasets={"val": val}, optimizer=opt, **kw)
    return model, opt, flex




def less(**kw):
    args = dict(target="A", warmup_fraction=0.25, warmup_steps=6, num_checkpoints=2, keep_fraction=0.2,
                dim=512, target_samples=4, progress=False)
    return LessSelector(**{**args, **kw})


# -- (5) the Adam feature ---------------------------------------------------------------------------
def test_adam_feature_matches_formula_with_the_optimizers_real_state():
    model, opt, flex = make_run(less(projector="none"))
    for _ in range(3):
        step(flex, model, opt)
    st = flex.state.signals.optimizer_state("lora")
    assert st["betas"] == BETAS and st["eps"] == opt.param_groups[0]["eps"] and st["step"] == 3
    assert st["lr"] == opt.param_groups[0]["lr"]
    named = select_params(model, "lora")
    assert list(st["state"]) == list(named)
    for name, p in named.items():            # the real moments, by parameter identity
        assert torch.equal(st["state"][name]["exp_avg"], opt.state[p]["exp_avg"])
        assert torch.equal(st["state"][name]["exp_avg_sq"], opt.state[p]["exp_avg_sq"])
    # the formula, from one sample's plain autograd gradient
    batch = flex.data.batch(torch.tensor([5]))
    model.eval()
    from dataflex.core.loss import per_sample_loss
    loss = per_sample_loss(model(batch["input_ids"], position_ids=batch["position_ids"]), batch["labels"],
                           batch["loss_mask"])[0]
    grads = torch.autograd.grad(loss, list(named.values()))
    b1, b2, eps = 0.9, 0.95, opt.param_groups[0]["eps"]
    expect = torch.cat([((b1 * opt.state[p]["exp_avg"] + (1 - b1) * g)
                         / torch.sqrt(b2 * opt.state[p]["exp_avg_sq"] + (1 - b2) * g * g + eps)).flatten()
                        for p, g in zip(named.values(), grads)])
    g = torch.cat([t.flatten() for t in grads])
    m = torch.cat([st["state"][n]["exp_avg"].flatten() for n in named])
    v = torch.cat([st["state"][n]["exp_avg_sq"].flatten() for n in named])
    torch.testing.assert_close(adam_feature(g, m, v, st["betas"], st["eps"]), expect, rtol=1e-6, atol=1e-7)
    # and the plugin's own path (exact per-sample gradients, projector none) gives the same feature
    out = per_sample_grads(model, batch, "lora")
    plugin = flex.engine.of("selector")
    opt_flat = {"exp_avg": m, "exp_avg_sq": v, "betas": st["betas"], "eps": st["eps"]}
    torch.testing.assert_close(plugin.featurizer.featurize(out.flat(), opt_flat)[0], l2_normalize(expect.double()),
                               rtol=1e-5, atol=1e-6)
    # eps inside the square root, no bias correction: not Adam's update direction
    bias_corrected = (m / (1 - b1 ** 3)) / ((v / (1 - b2 ** 3)).sqrt() + eps)
    assert not torch.allclose(adam_feature(torch.zeros_like(m), m, v, st["betas"], st["eps"]), bias_corrected)


def test_optimizer_state_errors():
    model, opt, flex = make_run(less())
    flex.optimizer = None
    with pytest.raises(RuntimeError, match="optimizer=opt|DataFlex\\(optimizer"):
        flex.state.signals.optimizer_state("lora")
    flex.optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="no Adam betas"):
        flex.state.signals.optimizer_state("lora")
    flex.optimizer = torch.optim.AdamW([p for n, p in model.named_parameters() if "lora" not in n])
    with pytest.raises(ValueError, match="is not trained by the optimizer"):
        flex.state.signals.optimizer_state("lora")


# -- (2) projection ----------------------------------------------------------------------------------
def test_projected_cosines_correlate_with_exact_and_improve_with_dim():
    model = tiny_gpt(lora_rank=4)
    data = MixtureDataset(synthetic_domains(n_per_domain=16))
    g = per_sample_grads(model, data.batch(torch.arange(len(data))), "lora").flat().double()
    exact = (l2_normalize(g) @ l2_normalize(g).T)[torch.triu_indices(len(g), len(g), 1).unbind()]
    for kind in (SparseProjector, RademacherProjector):
        corr = []
        for d in (256, 1024, 4096):
            rs = []
            for seed in range(3):
                f = l2_normalize(kind(d, seed=seed).project(g.float()).double())
                proj = (f @ f.T)[torch.triu_indices(len(g), len(g), 1).unbind()]
                rs.append(float(torch.corrcoef(torch.stack([proj, exact]))[0, 1]))
            corr.append(sum(rs) / len(rs))
        assert min(corr) > 0.9, (kind.__name__, corr)
        assert corr[0] < corr[1] < corr[2], (kind.__name__, corr)


# -- (3) cosine vs dot --------------------------------------------------------------------------------
def test_dot_products_skew_to_short_samples_cosine_does_not():
    """One source (A), half the samples with 4 label tokens, half with 16: per-token-mean losses of short samples have larger
    gradients, so raw inner products with the target favour them; cosines do not."""
    model = tiny_gpt(lora_rank=4)
    base = synthetic_domains(n_per_domain=64)["A"]
    lengths = torch.tensor([4 if i % 2 else 16 for i in range(64)])
    batch = MixtureDataset({"C": base}).batch(torch.arange(64))
    batch["loss_mask"] = (torch.arange(batch["loss_mask"].shape[1])[None] < lengths[:, None]).float()
    g = per_sample_grads(model, batch, "lora").flat()
    target = MixtureDataset({"C": synthetic_domains(n_per_domain=8, seed=1)["A"]})
    t = per_sample_grads(model, target.batch(torch.arange(8)), "lora").flat()
    which = torch.zeros(8, dtype=torch.long)
    dot = less_scores([g], [t], which, [1.0], normalize=False)
    cos = less_scores([g], [t], which, [1.0], normalize=True)
    short = lengths == 4
    top_dot, top_cos = top_fraction(dot, 0.25), top_fraction(cos, 0.25)
    assert g[short].norm(dim=1).mean() > 1.5 * g[~short].norm(dim=1).mean()
    assert short[top_dot].float().mean() >= 0.9                  # half the pool is short
    assert short[top_cos].float().mean() <= 0.5


# -- pure pieces ---------------------------------------------------------------------------------------
def test_aggregate_weights_checkpoints_and_takes_max_over_unequal_subtasks():
    assert checkpoint_weights([2.0, 1.0, 1.0]).tolist() == [0.5, 0.25, 0.25]
    per = torch.tensor([[[1.0, 0.0], [0.0, 0.2]], [[0.0, 0.0], [0.0, 1.0]]])       # [C=2, N=2, J=2]
    s, sub = aggregate(per, [3.0, 1.0])
    torch.testing.assert_close(sub, torch.tensor([[0.75, 0.0], [0.0, 0.4]], dtype=torch.float64))
    torch.testing.assert_close(s, torch.tensor([0.75, 0.4], dtype=torch.float64))
    # unequal subtask sizes: mean within each subtask, not a reshape
    train = torch.eye(3)
    target = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0]])
    scores = less_scores([train], [target], torch.tensor([0, 0, 1]), [1.0])
    assert scores.tolist() == [1.0, 1.0, 0.0]
    assert top_fraction(torch.tensor([0.1, 0.5, 0.5, 0.2]), 0.5).tolist() == [False, True, True, False]


# -- (1) and (4) on the toy corpus ---------------------------------------------------------------------
def run_to_selection(plugin, steps=8, **kw):
    model, opt, flex = make_run(plugin, **kw)
    batches, records = [], []
    for _ in range(steps):
        b, r = step(flex, model, opt)
        batches.append(b)
        records.append(r)
    return model, opt, flex, batches, records


def kept_domains(flex, plugin):
    return flex.data.domain[plugin.kept_ids]


def test_toy_corpus_less_top_k_is_dominated_by_the_target_domain_random_is_not():
    plugin = less()
    _, _, flex, batches, records = run_to_selection(plugin)
    assert [r["selector/phase"] for r in records] == ["warmup"] * 6 + ["selected"] * 2
    # warm-up: a quarter of every domain, drawn in proportion
    assert records[0]["selector/kept/A"] == 12 and records[0]["selector/kept/B"] == 12
    dom = kept_domains(flex, plugin)
    assert len(dom) == round(0.2 * 144)
    assert (dom == 0).float().mean() > 0.6, dom.tolist()
    # from the step after the warm-up, every batch comes from the kept pool, domains in proportion to it
    kept = set(plugin.kept_ids.tolist())
    for b in batches[6:]:
        assert set(b["sample_id"].tolist()) <= kept
    assert records[-1]["selector/kept/A"] == int((dom == 0).sum())
    assert plugin.checkpoint_steps == [3, 6] and len(plugin.per_checkpoint) == 2
    files = flex.finish()["less_selection.json"]
    assert files["sample_ids"] == plugin.kept_ids.tolist() and files["checkpoint_steps"] == [3, 6]
    assert abs(sum(files["checkpoint_weights"]) - 1) < 1e-12 and files["betas"] == list(BETAS)
    json.dumps(files)
    # random's keep set is not dominated by A
    rnd = RandomSelector(keep_fraction=0.2, seed=0)
    _, _, rflex, rbatches, _ = run_to_selection(rnd, steps=4)
    ids = torch.cat([b["sample_id"] for b in rbatches])
    assert (rflex.data.domain[ids] == 0).float().mean() < 0.5


def test_two_target_subtasks_max_picks_from_both_matching_sources():
    """Sources A and C each match one subtask; B's samples sit halfway between the two. The mean over
    subtasks (the anchor's aggregation) prefers the generic B; the max keeps A and C."""
    g = torch.Generator().manual_seed(0)
    a, c = torch.eye(64)[0], torch.eye(64)[1]
    noise = lambda n: 0.05 * torch.randn(n, 64, generator=g)          # noqa: E731
    pool = torch.cat([a + noise(20), (a + c) / 2 ** 0.5 + noise(20), c + noise(20)])
    source = torch.arange(60) // 20
    target = torch.cat([a + noise(6), c + noise(2)])                    # unequal subtask sizes
    which = torch.tensor([0] * 6 + [1] * 2)
    top_max = top_fraction(less_scores([pool], [target], which, [1.0]), 0.3)
    assert (source[top_max] == 0).sum() >= 5 and (source[top_max] == 2).sum() >= 5 and not (source[top_max] == 1).any()
    mean = less_scores([pool], [target], torch.zeros(8, dtype=torch.long), [1.0])
    sub = torch.stack([less_scores([pool], [target[which == j]], torch.zeros(int((which == j).sum()), dtype=torch.long),
                                   [1.0]) for j in range(2)]).mean(0)
    assert (source[top_fraction(sub, 0.3)] == 1).all()                  # the average of subtask means: B
    assert not (source[top_fraction(mean, 0.3)] == 2).any()             # the pooled mean: A (6 of 8 targets)
    # through the plugin on the toy corpus: a list of targets gives one subtask each, [N, J] scores
    plugin = less(target=["A", "C"], keep_fraction=0.3)
    _, _, flex, _, _ = run_to_selection(plugin, steps=7)
    assert plugin.subtask_names == ["A", "C"] and plugin.per_subtask.shape == (144, 2)
    torch.testing.assert_close(plugin.scores, plugin.per_subtask.max(1).values)
    # a target dataset with several domains gives one subtask per domain
    plugin2 = less(target="val", keep_fraction=0.3)
    run_to_selection(plugin2, steps=7)
    assert plugin2.subtask_names == ["val/A", "val/B", "val/C"]


def test_resume_mid_warmup_continues_exactly(tmp_path):
    def run(stop=None):
        def build():
            return make_run(less(warmup_steps=4, features_dir=str(tmp_path / f"f{stop}")), n=24)
        model, opt, flex = build()
        ids = []
        for s in range(6):
            if s == stop:
                sd = roundtrip({"flex": flex.state_dict(), "model": model.state_dict(), "opt": opt.state_dict()})
                model, opt, flex = build()
                flex.load_state_dict(sd["flex"])
                model.load_state_dict(sd["model"])
                opt.load_state_dict(sd["opt"])
            b, _ = step(flex, model, opt)
            ids.append(b["sample_id"])
        return torch.stack(ids), flex.engine.of("selector")

    full, p_full = run()
    for stop in (3, 5):                 # between the checkpoints; after the selection
        resumed, p = run(stop)
        assert torch.equal(full, resumed), stop
        assert torch.equal(p.scores, p_full.scores)
    meta = json.loads((tmp_path / "fNone" / "checkpoint_1.json").read_text())
    assert meta["projector"]["projector"] == "dataflex.sparse_jl.v1" and meta["betas"] == list(BETAS)
    assert meta["step"] == 4 and meta["mean_lr"] == pytest.approx(3e-3)
    feats = np.load(tmp_path / "fNone" / "checkpoint_1_train.npy", mmap_mode="r")
    assert feats.shape == (72, 512) and feats.dtype == np.float16
    np.testing.assert_allclose(np.load(tmp_path / "fNone" / "scores.npy"), p_full.scores.numpy())


def test_selection_file_starts_training_on_it(tmp_path):
    path = tmp_path / "sel.json"
    path.write_text(json.dumps({"sample_ids": [0, 1, 2, 3, 100, 101]}))
    plugin = less(selection=str(path))
    _, _, flex, batches, records = run_to_selection(plugin, steps=2)
    assert records[0]["selector/phase"] == "selected"
    for b in batches:
        assert set(b["sample_id"].tolist()) <= {0, 1, 2, 3, 100, 101}
    assert records[0]["selector/kept/A"] == 4 and records[0]["selector/kept/B"] == 0


def test_online_rescoring_replaces_the_kept_pool():
    plugin = less(rescore_every=2)
    _, _, flex, batches, records = run_to_selection(plugin, steps=10)
    assert [r.get("selector/rescored", 0) for r in records] == [0] * 8 + [1, 0]
    assert len(plugin.per_checkpoint) == 2 and plugin.scores.shape == (144,)
    kept = set(plugin.kept_ids.tolist())
    assert set(batches[8]["sample_id"].tolist()) <= kept and set(batches[9]["sample_id"].tolist()) <= kept


# -- the known defect: a domain masked to nothing comes back -------------------------------------------
def test_domain_masked_to_nothing_comes_back():
    s = DataAwareSampler([4, 4], seed=0)
    s.set_pool(masks={0: torch.zeros(4, dtype=torch.bool)}, proportional=True)
    assert s.weights.tolist() == [0.0, 1.0] and s.pool_sizes() == [0, 4]
    s.set_pool(masks={0: torch.tensor([True, False, True, False])}, proportional=True)
    assert s.pool_sizes() == [2, 4] and abs(s.weights[0].item() - 1 / 3) < 1e-12
    s.set_pool([1.0, 0.0], masks={1: torch.zeros(4, dtype=torch.bool)})      # weights and masks at once
    with pytest.raises(ValueError, match="excludes every sample"):
        s.set_pool([0.5, 0.5])
    assert s.weights.tolist() == [1.0, 0.0]                                    # nothing changed on error
    # through DataFlex with no mixer: a plugin empties a domain, then brings it back
    from dataflex.core.events import Event
    from dataflex.core.plugin import Selector

    class Flip(Selector):
        events = (Event.BEFORE_SAMPLE, Event.AFTER_CANDIDATES)

        def apply(self, event, state):
            if event == Event.AFTER_CANDIDATES:
                state.keep_mask = torch.ones(len(state.candidate_ids), dtype=torch.bool)
            elif state.step == 0:
                state.pool_masks[1] = torch.zeros(state.domain_sizes[1], dtype=torch.bool)
            elif state.step == 1:
                state.pool_masks[1] = torch.ones(state.domain_sizes[1], dtype=torch.bool)

    model, opt, flex = make_run(Flip(), n=16)
    b0, _ = step(flex, model, opt)
    assert not (b0["domain"] == 1).any()
    domains = torch.cat([step(flex, model, opt)[0]["domain"] for _ in range(4)])
    assert (domains == 1).any()


# -- packed rows ----------------------------------------------------------------------------------------
def test_packed_warmup_counts_token_epochs_and_withdraws_waiting_warmup_samples():
    """Under packing the warm-up's epochs count the pool's label tokens (a step trains rows x seq_len slots);
    samples drawn in the warm-up that wait for a row when the selection lands are withdrawn (counted, never
    trained), so from the selection on only kept samples train; every warm-up draw is trained or withdrawn."""
    from test_packing import SEQ, VOCAB, ragged_domains

    from dataflex.models.tiny_gpt import TinyGPT
    model = TinyGPT(vocab_size=VOCAB, seq_len=SEQ, d_model=32, n_layers=2, n_heads=4, lora_rank=4, seed=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, betas=BETAS)
    plugin = LessSelector(target="short", warmup_fraction=0.5, warmup_epochs=2, num_checkpoints=2,
                          keep_fraction=0.2, dim=256, target_samples=4, progress=False)
    data = MixtureDataset(ragged_domains())
    flex = DataFlex(data, global_batch_size=4, plugins=[plugin], interface=TorchInterface(model), optimizer=opt,
                    packing=True, pack_lookahead=8)
    trained, records, pending, pool = [], [], [], None
    while plugin.phase != "selected" or flex.step < plugin.warmup_steps + 3:
        pending.append(list(flex.sampler.pending))
        b, r = step(flex, model, opt)
        trained.append(b["sample_id"].tolist())
        records.append(r)
        if pool is None:                                    # the warm-up pool, as the sampler holds it
            pool = torch.cat([off + torch.nonzero(flex.sampler.keep_mask(d)).flatten()
                              for d, off in enumerate(flex.sampler.offsets)])
    tokens = int(data.lengths(pool).sum())
    assert plugin.warmup_steps == -(-2 * tokens // (4 * SEQ)) and plugin.warmup_steps < len(pool) // 2
    w = plugin.warmup_steps
    kept = set(plugin.kept_ids.tolist())
    waiting = pending[w]                                    # drawn in the warm-up, waiting when it ends
    withdrawn = [i for i in waiting if i not in kept]
    assert withdrawn, "the run should end its warm-up with samples waiting outside the kept pool"
    assert records[w].get("pack/withdrawn") == len(withdrawn)
    assert all(set(ids) <= kept for ids in trained[w:])
    assert set(i for ids in trained[:w] for i in ids) <= set(pool.tolist())


# -- the one command -------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("packing", [False, True])
def test_launch_less_trains_on_kept_samples_after_warmup(tmp_path, monkeypatch, packing):
    import sys

    from test_launch import FAST, ROOT, run
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = [a for a in FAST if not a.startswith("trainer.max_steps")]
    run([sys.executable, str(ROOT / "launch" / "train.py"), "backend=torch", "logger=none", "+selector=less",
         "selector.target=math", "selector.warmup_steps=4", "selector.num_checkpoints=2", "selector.dim=256",
         "selector.keep_fraction=0.05", "model.lora_rank=4", "trainer.max_steps=7",
         f"trainer.packing={str(packing).lower()}", *args, f"hydra.run.dir={tmp_path}"])
    sel = json.loads((tmp_path / "less_selection.json").read_text())
    ledger = pd.read_parquet(tmp_path / "ledger")
    kept = set(sel["sample_ids"])
    after = ledger[ledger.selected & (ledger.step >= 4)]
    warm = ledger[ledger.selected & (ledger.step < 4)]
    assert set(after.sample_id) <= kept and not set(warm.sample_id) <= kept   # no warm-up sample waits past it
    if packing:      # every row of every step used, each sample once a step
        assert after.groupby("step")["row"].nunique().tolist() == [8] * 3
        assert warm.groupby("step")["row"].nunique().tolist() == [8] * 4
        assert not ledger[ledger.selected].duplicated(["step", "sample_id"]).any()
    else:
        assert len(after) == 3 * 8 and len(warm) == 4 * 8
    assert sel["checkpoint_steps"] == [2, 4] and sel["subtasks"] == ["math"]
    counts = sel["kept_per_domain"]
    assert sum(counts.values()) == len(kept)
    # with no mixer, domains are drawn in proportion to what each kept
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    last = [x for x in lines if "train_loss" in x][-1]
    for d, n in counts.items():
        assert abs(last["domain_weights"][d] - n / len(kept)) < 1e-9
        assert last[f"selector/kept/{d}"] == n
    assert {"checkpoint_0.json", "checkpoint_0_cos.npy", "checkpoint_0_target.npy", "checkpoint_0_train.npy",
            "checkpoint_1.json", "scores.npy"} <= {p.name for p in (tmp_path / "less").iterdir()}


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_optimizer_state_under_deepspeed_matches_torch(stage):
    """ZeRO 0: the basic optimizer by parameter identity; ZeRO 1/2: DeepSpeed's partitioned fp32
    state assembled per parameter. Both equal a plain torch run of the same steps."""
    import copy
    import os
    import sys
    from pathlib import Path
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    from dataflex.backends import DeepSpeedBackend, TorchBackend
    model = tiny_gpt(lora_rank=2)
    plain = TorchBackend(copy.deepcopy(model), lr=1e-2)
    ds = DeepSpeedBackend(model, micro_batch_size=8, zero_stage=stage, lr=1e-2)
    data = synthetic_domains(n_per_domain=8)
    states = []
    for backend in (plain, ds):
        flex = DataFlex(data, global_batch_size=8, interface=backend.interface, optimizer=backend.optimizer)
        for _ in range(2):
            batch = flex.next_batch()
            loss = flex.loss(backend.forward(batch), batch)
            backend.step(loss)
            flex.end_step()
        states.append(flex.state.signals.optimizer_state("lora"))
    want, got = states
    assert got["betas"] == want["betas"] == BETAS and got["eps"] == want["eps"] and got["lr"] == want["lr"]
    assert list(got["state"]) == list(want["state"])
    for name in want["state"]:
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(got["state"][name][key], want["state"][name][key], rtol=1e-4, atol=1e-9)


@pytest.mark.slow
def test_score_offline_resumes_and_its_selection_trains(tmp_path, monkeypatch):
    """launch/score.py over a run's checkpoints; a scoring stopped half-way continues to the same
    scores; `selector.selection=PATH` then trains on the kept samples only."""
    import sys

    from test_launch import FAST, ROOT, run
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    fast = [a for a in FAST if not a.startswith("trainer.max_steps")]
    warm = tmp_path / "warm"
    run([sys.executable, str(ROOT / "launch" / "train.py"), "backend=torch", "logger=none", "model.lora_rank=4",
         "trainer.max_steps=4", "trainer.checkpoint_every=2", *fast, f"hydra.run.dir={warm}"])
    score = [sys.executable, str(ROOT / "launch" / "score.py"), str(warm), "--target", "math", "--dim", "256",
             "--target-samples", "8", "--chunk-size", "256", "--out", str(tmp_path / "scores")]
    proc = run(score)
    assert "kept" in proc.stdout
    sel = json.loads((tmp_path / "scores" / "less_selection.json").read_text())
    assert sel["checkpoints"] == ["step_0000002", "step_0000004"] and sel["checkpoint_steps"] == [2, 4]
    first = np.load(tmp_path / "scores" / "scores.npy")
    # a crash half-way through checkpoint 1: rows after 1024 never written
    meta_path = tmp_path / "scores" / "checkpoint_1.json"
    meta = json.loads(meta_path.read_text())
    meta["done"] = 1024
    meta_path.write_text(json.dumps(meta))
    cos = np.load(tmp_path / "scores" / "checkpoint_1_cos.npy", mmap_mode="r+")
    cos[1024:] = 0
    cos.flush()
    del cos
    run(score)
    np.testing.assert_allclose(np.load(tmp_path / "scores" / "scores.npy"), first, rtol=1e-12)
    assert json.loads(meta_path.read_text())["done"] == len(first)
    # train on the selection
    trained = tmp_path / "trained"
    run([sys.executable, str(ROOT / "launch" / "train.py"), "backend=torch", "logger=none", "+selector=less",
         f"selector.selection={tmp_path / 'scores' / 'less_selection.json'}", "model.lora_rank=4",
         "trainer.max_steps=3", *fast, f"hydra.run.dir={trained}"])
    ledger = pd.read_parquet(trained / "ledger")
    assert set(ledger[ledger.selected].sample_id) <= set(sel["sample_ids"])
