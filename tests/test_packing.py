"""Packed batches (dataflex.core.packing): several samples a row, every per-sample signal still per sample.

Each check compares against an independent computation: the same samples run padded, one per row."""
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import roundtrip

from dataflex.core.loss import LossWrapper, per_sample_loss, per_token_loss, reduce_loss
from dataflex.core.packing import Segments, plan_rows
from dataflex.core.sampler import DataAwareSampler
from dataflex.data.mixture import MixtureDataset
from dataflex.data.samples import chunk_documents
from dataflex.grad.interface import TorchInterface
from dataflex.models.hf import forward_for
from dataflex.models.tiny_gpt import TinyGPT
from dataflex.mixers import StaticMixer
from dataflex.reweighters import LossReweighter
from dataflex.selectors import LossSelector
from dataflex.session.flex import DataFlex

SEQ, VOCAB = 32, 64


def ragged_domains(seed=0, n_docs=40, seq_len=SEQ):
    """Three domains of documents of 2..70 tokens cut into seq_len-label samples: short ones, long ones
    (several chunks, the last one short) and a mix, so rows hold several samples of every length."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (lo, hi) in {"short": (2, 12), "long": (20, 70), "mixed": (2, 70)}.items():
        docs = [(f"{name}{i}", torch.randint(1, VOCAB, (int(torch.randint(lo, hi + 1, (1,), generator=g)),),
                                             generator=g).tolist()) for i in range(n_docs)]
        out[name] = chunk_documents(docs, seq_len, 0)
    return out


def tiny(seed=0):
    return TinyGPT(vocab_size=VOCAB, seq_len=SEQ, d_model=32, n_layers=2, n_heads=4, seed=seed).eval()


def padded_losses(model_forward, data, ids):
    batch = data.batch(ids)
    return per_sample_loss(model_forward(batch), batch["labels"], batch["loss_mask"])


# -- planning ----------------------------------------------------------------------------------------------

def test_first_fit_is_deterministic_fills_rows_and_drops_nothing():
    data = MixtureDataset(ragged_domains())
    lengths = data.lengths(torch.arange(len(data)))
    assert lengths.min() >= 1 and lengths.max() == SEQ

    def run(steps=12):
        sampler = DataAwareSampler(data.sizes, seed=3)
        drawn, plans = [], []

        def draw(n):
            ids = sampler.draw(n)
            drawn.extend(ids.tolist())
            return ids
        for _ in range(steps):
            plan = plan_rows(sampler.pending, draw, data.lengths, 4, SEQ, lookahead=6)
            sampler.pending = plan.carry
            plans.append(plan)
        return drawn, plans, sampler.pending

    drawn, plans, pending = run()
    drawn2, plans2, pending2 = run()
    assert drawn == drawn2 and pending == pending2
    for a, b in zip(plans, plans2):
        assert torch.equal(a.ids, b.ids) and torch.equal(a.rows, b.rows) and torch.equal(a.offsets, b.offsets)
    trained = [i for p in plans for i in p.ids.tolist()]
    assert sorted(trained + pending) == sorted(drawn)            # every draw trained once or still waiting
    assert len(pending) <= 6 + 4 * SEQ
    for p in plans:
        assert set(p.rows.tolist()) == {0, 1, 2, 3}              # no row left empty
        for r in range(4):
            on = p.rows == r
            off, n = p.offsets[on], p.lengths[on]
            assert torch.equal(off, torch.cat([torch.zeros(1, dtype=torch.long), n.cumsum(0)[:-1]]))  # back to back
            assert int(n.sum()) <= SEQ
        assert torch.equal(p.lengths, torch.from_numpy(lengths[p.ids.numpy()]))
    fill = sum(p.slots_used() for p in plans) / (len(plans) * 4 * SEQ)
    assert fill > 0.9, fill


def test_waiting_samples_are_placed_first_and_wait_about_one_step():
    """What waits never fills more than half a step before drawing stops, and longest-first placement puts
    any set of samples of at most half the slots into empty rows: every pending sample trains the next step
    (checked on random lengths, then over a run)."""
    g = np.random.default_rng(0)
    for _ in range(200):
        R, T = int(g.integers(1, 9)), int(g.integers(8, 65))
        lens = g.integers(0, T + 1, size=int(g.integers(1, 4 * R + 2)))
        keep = np.cumsum(lens) <= R * T // 2
        ids = np.flatnonzero(keep)
        plan = plan_rows(ids.tolist(), None, lambda i, lens=lens: lens[np.asarray(i)], R, T)
        assert plan.carry == [] and sorted(plan.ids.tolist()) == ids.tolist()
        assert (np.bincount(plan.rows.numpy(), weights=plan.lengths.numpy(), minlength=R) <= T).all()
    data = MixtureDataset(ragged_domains())
    sampler = DataAwareSampler(data.sizes, seed=0)
    born, waits = {}, []
    def draw(n, step):
        ids = sampler.draw(n)
        for i in ids.tolist():
            born.setdefault(i, []).append(step)
        return ids
    for step in range(100):
        plan = plan_rows(sampler.pending, lambda n, step=step: draw(n, step), data.lengths, 4, SEQ)
        sampler.pending = plan.carry
        waits += [step - born[i].pop(0) for i in plan.ids.tolist()]
    assert max(waits) <= 3 and np.mean(waits) < 1


def test_packed_batch_holds_each_sample_as_its_padded_row():
    data = MixtureDataset(ragged_domains())
    sampler = DataAwareSampler(data.sizes, seed=1)
    plan = plan_rows([], sampler.draw, data.lengths, 3, SEQ)
    batch = data.packed_batch(plan.ids, plan.rows, plan.offsets, 3)
    padded = data.batch(plan.ids)
    seg = Segments.of(batch)
    for key in ("input_ids", "labels", "loss_mask", "position_ids"):
        unpacked = seg.unpack(batch[key])
        n = torch.from_numpy(data.lengths(plan.ids))
        inside = torch.arange(SEQ) < n[:, None]
        assert torch.equal(unpacked[inside], padded[key][inside]), key
    assert torch.equal(batch["domain"], padded["domain"]) and torch.equal(batch["sample_id"], plan.ids)
    assert (batch["segment_ids"] >= 0).sum() == int(batch["loss_mask"].sum())   # every filled slot is a label here


def test_packed_batch_from_shards_reads_the_padded_rows(tmp_path, monkeypatch):
    """Memory-mapped shards (what load_domains gives): each sample's slots equal its padded row's tokens."""
    from dataflex.data.domains import load_domains

    g = torch.Generator().manual_seed(0)
    words = ["alpha", "beta", "gamma", "delta", "eps"]
    docs = [" ".join(words[int(i)] for i in torch.randint(0, 5, (int(torch.randint(1, 40, (1,), generator=g)),),
                                                                  generator=g)) for _ in range(30)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    monkeypatch.setenv("DATAFLEX_CACHE", str(tmp_path / "cache"))
    data = MixtureDataset(load_domains({"domains": {"a": {"train": str(tmp_path / "a.jsonl")}}}, 16,
                                       progress=False).train)
    sampler = DataAwareSampler(data.sizes, seed=0)
    plan = plan_rows([], sampler.draw, data.lengths, 3, 16)
    batch, padded = data.packed_batch(plan.ids, plan.rows, plan.offsets, 3), data.batch(plan.ids)
    assert torch.equal(torch.from_numpy(data.lengths(plan.ids)), padded["loss_mask"].sum(-1).long())
    seg = Segments.of(batch)
    inside = torch.arange(16) < plan.lengths[:, None]
    for key in ("input_ids", "labels", "loss_mask"):
        assert torch.equal(seg.unpack(batch[key])[inside], padded[key][inside]), key


# -- the loss: packed equals padded ----------------------------------------------------------------------------

def packed_step(seed=0, rows=4):
    data = MixtureDataset(ragged_domains(seed))
    sampler = DataAwareSampler(data.sizes, seed=seed)
    plan = plan_rows([], sampler.draw, data.lengths, rows, SEQ)
    return data, plan, data.packed_batch(plan.ids, plan.rows, plan.offsets, rows)


@pytest.mark.parametrize("lean", [False, True])
def test_tinygpt_packed_per_sample_losses_equal_padded(lean):
    data, plan, batch = packed_step()
    model = tiny()
    assert batch["sample_id"].numel() > 4 and plan.rows.bincount().max() >= 2    # rows really hold several samples
    wrapper = LossWrapper()
    with torch.no_grad():
        out = model(batch["input_ids"], position_ids=batch["position_ids"], lean=lean)
        wrapper(out, batch)
        want = padded_losses(lambda b: model(b["input_ids"], position_ids=b["position_ids"]), data, plan.ids)
    torch.testing.assert_close(wrapper.last["loss"], want, atol=2e-5, rtol=1e-5)


def test_changing_one_sample_changes_no_other_loss_in_its_row():
    data, plan, batch = packed_step(seed=3)
    model = tiny(1)
    crowded = torch.nonzero(plan.rows == plan.rows.bincount().argmax()).flatten()
    assert len(crowded) >= 3
    victim = int(crowded[len(crowded) // 2])                          # a sample in the middle of a crowded row
    changed = {k: v.clone() for k, v in batch.items()}
    slots = batch["segment_ids"] == victim
    changed["input_ids"][slots] = (changed["input_ids"][slots] * 7 + 3) % VOCAB
    changed["labels"][slots] = (changed["labels"][slots] * 5 + 1) % VOCAB
    a, b = LossWrapper(), LossWrapper()
    with torch.no_grad():
        a(model(batch["input_ids"], position_ids=batch["position_ids"]), batch)
        b(model(changed["input_ids"], position_ids=changed["position_ids"]), changed)
    others = torch.arange(len(plan.ids)) != victim
    assert torch.equal(a.last["loss"][others], b.last["loss"][others])       # bit for bit: nothing leaks
    assert not torch.equal(a.last["loss"][victim], b.last["loss"][victim])


def llama(impl):
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                                   attn_implementation=impl)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_hf_llama_packed_per_sample_losses_equal_padded_and_do_not_leak(impl):
    model = llama(impl)
    forward = forward_for(model)
    data, plan, batch = packed_step(seed=2)
    wrapper = LossWrapper()
    with torch.no_grad():
        wrapper(forward(model, batch), batch)
        want = padded_losses(lambda b: forward(model, b), data, plan.ids)
    torch.testing.assert_close(wrapper.last["loss"], want, atol=2e-5, rtol=1e-5)
    # the control: the same rows as one sequence each (positions not restarting, no segments) differ
    joined = {k: v for k, v in batch.items() if k != "segment_ids"}
    joined["position_ids"] = torch.arange(SEQ).expand(len(batch["input_ids"]), SEQ)
    leaky = LossWrapper()
    with torch.no_grad():
        leaky(forward(model, joined), dict(joined, segment_ids=batch["segment_ids"],
                                           position_ids=batch["position_ids"]))
    assert not torch.allclose(leaky.last["loss"], want, atol=1e-3)
    # one sample's tokens changed: no other sample's loss moves
    crowded = int(plan.rows.bincount().argmax())                        # a row of several samples
    victim = int(torch.nonzero(plan.rows == crowded).flatten()[1])
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    changed["input_ids"][batch["segment_ids"] == victim] = 1
    other = LossWrapper()
    with torch.no_grad():
        other(forward(model, changed), changed)
    keep = torch.arange(len(plan.ids)) != victim
    torch.testing.assert_close(other.last["loss"][keep], wrapper.last["loss"][keep], atol=1e-6, rtol=0)
    assert not torch.allclose(other.last["loss"][victim], wrapper.last["loss"][victim])


@pytest.mark.parametrize("reduction", ["token", "sample"])
def test_weighted_packed_loss_and_gradient_equal_padded(reduction):
    """Sample weights [S] and token weights [S, T] (a sample's own layout) give the padded value and gradient."""
    data, plan, batch = packed_step(seed=3)
    padded = data.batch(plan.ids)
    S = len(plan.ids)
    g = torch.Generator().manual_seed(0)
    sw = torch.rand(S, generator=g, dtype=torch.float64) + 0.1
    tw = torch.rand(S, SEQ, generator=g, dtype=torch.float64)
    model = tiny(3)

    def value(b, seg):
        model.zero_grad()
        loss = reduce_loss(per_token_loss(model(b["input_ids"], position_ids=b["position_ids"]), b["labels"]),
                           b["loss_mask"], sw, tw, reduction, segments=seg)
        loss.backward()
        return loss.detach(), model.head.weight.grad.clone()
    got, got_grad = value(batch, Segments.of(batch))
    want, want_grad = value(padded, None)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-5, rtol=1e-4)


# -- the session: plugins, ledger, metrics, resume --------------------------------------------------------------

def flex_run(steps, seed=0, plugins=None, state=None, start=0):
    torch.manual_seed(seed)
    model = tiny(seed).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    flex = DataFlex(ragged_domains(), global_batch_size=4, interface=TorchInterface(model), seed=seed,
                    plugins=plugins() if plugins else [], packing=True, pack_lookahead=6)
    if state is not None:
        model.load_state_dict(state["model"])
        flex.load_state_dict(state["flex"])
    records, batches = [], []
    for _ in range(steps):
        batch = flex.next_batch()
        loss = flex.loss(model(batch["input_ids"], position_ids=batch["position_ids"]), batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        records.append(flex.end_step())
        batches.append(batch)
    return flex, model, records, batches


def plugins():
    return [StaticMixer(weights=[0.5, 0.3, 0.2]), LossSelector(0.5), LossReweighter(burnout_steps=1)]


@pytest.mark.parametrize("with_plugins", [False, True])
def test_session_ledger_metrics_and_per_sample_losses(with_plugins):
    flex, model, records, batches = flex_run(5, plugins=plugins if with_plugins else None)
    for rec, batch in zip(records, batches):
        led = pd.DataFrame(rec["ledger"])
        trained = led[led.selected]
        assert trained.sample_id.tolist() == batch["sample_id"].tolist()
        assert trained.row.tolist() == batch["row"].tolist() and set(trained.row) == {0, 1, 2, 3}
        assert (trained["rank"] == 0).all() and np.isfinite(trained.loss).all()
        labels = flex.data.lengths(batch["sample_id"])
        assert rec["tokens"] == int(labels.sum()) == int(batch["loss_mask"].sum())
        assert rec["token_slots"] == 4 * SEQ and rec["tokens"] <= rec["token_slots"]
        assert sum(rec["domain_tokens"].values()) == rec["tokens"]
        if with_plugins:
            assert (led[~led.selected]["rank"] == -1).all()
    if with_plugins:          # candidates the selector left (a step filled by waiting samples draws none)
        assert sum(int((~pd.DataFrame(rec["ledger"]).selected).sum()) for rec in records) > 0
    assert len(flex.state.losses) == len(flex.state.batch_ids) > 4


def test_every_drawn_sample_is_trained_once_or_waits():
    flex, *_ = flex_run(0)
    drawn = []
    draw = flex.sampler.draw
    flex.sampler.draw = lambda n: drawn.append(draw(n)) or drawn[-1]
    model = tiny()
    trained = []
    for _ in range(8):
        batch = flex.next_batch()
        flex.loss(model(batch["input_ids"], position_ids=batch["position_ids"]), batch)
        trained += pd.DataFrame(flex.end_step()["ledger"]).sample_id.tolist()
    assert sorted(trained + flex.sampler.pending) == sorted(torch.cat(drawn).tolist())


@pytest.mark.parametrize("with_plugins", [False, True])
def test_resume_continues_exactly_with_the_waiting_samples(with_plugins):
    make = plugins if with_plugins else None
    flex, model, records, batches = flex_run(6, plugins=make)
    first, fmodel, _, _ = flex_run(3, plugins=make)
    assert first.sampler.pending, "the checkpoint should hold samples waiting for a row"
    state = roundtrip({"flex": first.state_dict(), "model": fmodel.state_dict()})
    _, _, rest, rest_batches = flex_run(3, plugins=make, state=state)
    for a, b in zip(batches[3:], rest_batches):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for a, b in zip(records[3:], rest):
        assert a["ledger"] == b["ledger"] and a["tokens"] == b["tokens"]


# -- end to end ------------------------------------------------------------------------------------------------

def test_launch_train_packed_ledger_holds_each_trained_sample_once(tmp_path):
    from test_launch import FAST, run

    root = Path(__file__).resolve().parents[1]
    fast = [x for x in FAST if not x.startswith("model.seq_len=")] + ["model.seq_len=256"]
    run([sys.executable, "launch/train.py", "backend=torch", "logger=none", "trainer.packing=true", *fast,
         "trainer.eval_every=6", "trainer.plot=false", f"hydra.run.dir={tmp_path}"], cwd=root)
    ledger = pd.read_parquet(tmp_path / "ledger")
    steps = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in steps if "train_loss" in x]
    assert len(steps) == 6 and ledger.selected.all()
    assert ledger.groupby("step")["row"].nunique().tolist() == [8] * 6      # every row of every step used
    assert not ledger.duplicated(["step", "sample_id"]).any()
    per_step = ledger.groupby("step").size().tolist()
    assert max(per_step) > 8 and min(per_step) >= 8                         # rows hold several samples
    for x in steps:
        assert x["token_slots"] == 8 * 256 and 0 < x["tokens"] <= x["token_slots"]
        assert sum(x["domain_tokens"].values()) == x["tokens"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["tokens"] == sum(x["tokens"] for x in steps)
    share = summary["token_share"]                  # no mixer: size-proportional draws, in samples
    assert share["unit"] == "sample" and set(share["target"]) == set(share["achieved"]) == set(summary["domain_weights"])
    for d, n in share["achieved"].items():
        assert n == pytest.approx(sum(x["domain_tokens"][d] for x in steps) / summary["tokens"])
    assert sum(share["target"].values()) == pytest.approx(1.0)
