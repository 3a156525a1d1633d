"""The baselines every pool selector is compared against: length-matched random (same length histogram and
token budget as a given selection) and BM25 against the target set (the bm25s package): their pure functions
on small cases worked by hand and against the package, then both in a DataFlex session on real text."""
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import roundtrip, step, tiny_gpt

from dataflex.data.domains import MixtureDataset
from dataflex.data.samples import chunk_documents
from dataflex.grad.interface import TorchInterface
from dataflex.selectors import SELECTORS, BM25Selector, LengthMatchedSelector, bm25_scores, length_matched
from dataflex.selectors.length_matched import length_bins, read_selection
from dataflex.selectors.pool import sample_lengths
from dataflex.session.flex import DataFlex
from dataprep.tokenizer import load_tokenizer

import bm25s

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ("prose", "code", "math", "noise")
pytestmark = pytest.mark.usefixtures("one_thread")


# -- length-matched random -----------------------------------------------------------------------------
def skewed_pool(n=2000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 257, (n,), generator=g)


def test_length_bins_by_hand():
    assert length_bins(torch.tensor([0, 5, 9, 10]), 2).tolist() == [0, 1, 1, 1]   # [0, 5) [5, 10]
    assert length_bins(torch.tensor([7, 7, 7]), 4).tolist() == [0, 0, 0]


@pytest.mark.parametrize("bins", [1, 8, 20])
def test_length_matched_has_the_selections_histogram_and_token_budget(bins):
    """A selection biased to long samples (the longest 10% of the pool): the draw has its histogram bin for
    bin, its size, its token total to within one bin width per sample; it is random (not the selection) and
    a function of the seed."""
    lengths = skewed_pool()
    selected = torch.argsort(-lengths)[:200]
    keep = length_matched(lengths, selected, bins, seed=3)
    which = length_bins(lengths, bins)
    assert torch.equal(torch.bincount(which[keep], minlength=bins), torch.bincount(which[selected], minlength=bins))
    assert int(keep.sum()) == 200
    width = (int(lengths.max()) - int(lengths.min())) / bins
    assert abs(int(lengths[keep].sum()) - int(lengths[selected].sum())) <= 200 * width
    mine = torch.zeros_like(keep)
    mine[selected] = True
    if bins > 1:            # a uniform draw from the pool would be far shorter: the match is the point
        assert lengths[keep].double().mean() > lengths.double().mean() + 50
    assert torch.equal(keep, length_matched(lengths, selected, bins, seed=3))
    assert not torch.equal(keep, length_matched(lengths, selected, bins, seed=4))
    if bins == 20:          # within a bin the draw is random: it is not the selection itself
        assert (keep & mine).sum() < 200


def test_length_matched_refuses_a_selection_from_other_data():
    with pytest.raises(ValueError, match="outside this pool"):
        length_matched(torch.tensor([3, 4, 5]), torch.tensor([0, 7]), 2, 0)
    with pytest.raises(ValueError, match="empty"):
        length_matched(torch.tensor([3, 4, 5]), torch.tensor([], dtype=torch.long), 2, 0)


def test_read_selection_from_a_file_or_a_run_folder(tmp_path):
    (tmp_path / "near_selection.json").write_text(json.dumps({"sample_ids": [4, 1, 9]}))
    assert read_selection(str(tmp_path)).tolist() == [4, 1, 9]
    assert read_selection(str(tmp_path / "near_selection.json")).tolist() == [4, 1, 9]
    (tmp_path / "bm25_selection.json").write_text(json.dumps({"sample_ids": [2]}))
    with pytest.raises(FileNotFoundError, match="2 \\*selection.json files"):
        read_selection(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such file"):
        LengthMatchedSelector(reference=str(tmp_path / "missing.json"))


# -- BM25 ------------------------------------------------------------------------------------------------
DOCS = ["apple banana apple cherry", "banana durian", "cherry cherry cherry elder fig", "grape"]


def lucene_bm25(docs, query, k1=1.5, b=0.75):
    """Lucene's BM25 written out (Lucene 8+, which drops the constant (k1 + 1) factor): sum over query words w of
    idf(w) · tf / (tf + k1 (1 - b + b |d| / avgdl)), idf(w) = ln(1 + (N - df + 0.5) / (df + 0.5))."""
    words = [d.split() for d in docs]
    avg = sum(map(len, words)) / len(words)
    out = []
    for d in words:
        s = 0.0
        for w in query.split():
            df = sum(w in x for x in words)
            tf = d.count(w)
            if df:
                s += math.log(1 + (len(words) - df + 0.5) / (df + 0.5)) * tf / (
                    tf + k1 * (1 - b + b * len(d) / avg))
        out.append(s)
    return out


def test_bm25_by_hand_ranking():
    """Query "cherry banana", by hand (avgdl 3, idf of both words ln 2, k1 1.5, b 0.75): doc 0 has both once in 4
    words, 2 ln2 / (1 + 1.5 · 1.25) = 0.482; doc 2 has cherry 3 times in 5 words, 3 ln2 / (3 + 1.5 · 1.5) = 0.396
    (term frequency saturates, length is penalised); doc 1 has banana once in 2, ln2 / (1 + 1.5 · 0.75) = 0.326;
    doc 3 (grape) 0. Ranking 0, 2, 1, 3; every number also the written-out formula's."""
    scores = bm25_scores(DOCS, ["cherry banana"])
    ln2 = math.log(2)
    assert scores.tolist() == pytest.approx([2 * ln2 / 2.875, ln2 / 2.125, 3 * ln2 / 5.25, 0.0], rel=1e-6)
    assert scores.tolist() == pytest.approx(lucene_bm25(DOCS, "cherry banana"), rel=1e-6)
    assert scores.argsort()[::-1].tolist() == [0, 2, 1, 3]


def test_bm25_equals_the_package_directly_mean_and_max():
    """The selector's scores: the mean (max) over target queries of bm25s's own get_scores."""
    targets = ["banana durian", "fig fig elder", "kiwi", "Apple and CHERRY!"]
    index = bm25s.BM25()
    index.index(bm25s.tokenize(DOCS, stopwords="en", show_progress=False), show_progress=False)
    per_query = []
    for t in targets:
        words = [w for w in bm25s.tokenize([t], stopwords="en", return_ids=False, show_progress=False)[0]
                 if w in index.vocab_dict]
        per_query.append(index.get_scores(words).tolist() if words else [0.0] * len(DOCS))   # kiwi: no word known
    mean = [sum(q[i] for q in per_query) / len(targets) for i in range(len(DOCS))]
    assert bm25_scores(DOCS, targets).tolist() == pytest.approx(mean, rel=1e-6)
    assert bm25_scores(DOCS, targets, aggregate="max").tolist() == pytest.approx(
        [max(q[i] for q in per_query) for i in range(len(DOCS))], rel=1e-6)
    assert bm25_scores(DOCS, ["kiwi"]).tolist() == [0.0] * 4
    with pytest.raises(ValueError, match="aggregate"):
        bm25_scores(DOCS, targets, aggregate="sum")


# -- in a session, on real text ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus():
    """Four domains of the embedded corpus, training documents cut at 8..192 tokens (so lengths vary), 64-token
    samples; the code domain's validation documents (200 tokens) are the target."""
    tok = load_tokenizer(ROOT / "data" / "default" / "tokenizer.json")

    def read(domain, split, n):
        lines = (ROOT / "data" / "default" / domain / f"{split}.jsonl").read_text().splitlines()[:n]
        docs = [(f"{domain}:{i}", tok.encode(json.loads(x)["text"])[:(8 + 23 * i) if split == "train" else 200]
                 + [tok.eos_id])
                for i, x in enumerate(lines)]
        return chunk_documents(docs, 64, tok.eos_id)

    return {d: read(d, "train", 9) for d in DOMAINS}, {d: read(d, "val", 3) for d in DOMAINS}, tok


def make_flex(corpus, plugin, seed=0):
    train, val, tok = corpus
    model = tiny_gpt(vocab_size=tok.vocab_size, seq_len=64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    flex = DataFlex(train, global_batch_size=4, plugins=[plugin], interface=TorchInterface(model), seed=seed,
                    datasets={"val": MixtureDataset(val)}, optimizer=opt)
    return model, opt, flex


def test_registered_with_their_configs():
    assert SELECTORS.get_class("bm25") is BM25Selector and SELECTORS.get_class("length_matched") is LengthMatchedSelector
    for name in ("bm25", "length_matched"):
        assert (ROOT / "configs" / "selector" / f"{name}.yaml").is_file()


def test_bm25_keeps_the_target_domain_and_length_matched_follows_its_lengths(corpus, tmp_path):
    """bm25 against the code domain keeps mostly code; its export, read back by length_matched, gives a draw
    with the same length histogram and size, but not mostly code; both keep their choice through a resume."""
    model, opt, flex = make_flex(corpus, BM25Selector(target="code", keep_fraction=0.25))
    for _ in range(2):
        b, _ = step(flex, model, opt)
    plugin = flex.engine.of("selector")
    code = DOMAINS.index("code")
    share = (flex.data.domain == code).float().mean()
    assert share == 0.25 and (flex.data.domain[plugin.kept_ids] == code).float().mean() > 0.6
    assert set(b["sample_id"].tolist()) <= set(plugin.kept_ids.tolist())   # drawn from the kept pool
    export = flex.finish()["bm25_selection.json"]
    assert export["sample_ids"] == plugin.kept_ids.tolist() and export["target"] == ["code"]
    (tmp_path / "bm25_selection.json").write_text(json.dumps(export))

    def run(stop=None):
        model, opt, flex = make_flex(corpus, LengthMatchedSelector(reference=str(tmp_path), bins=6, seed=1))
        ids = []
        for s in range(4):
            if s == stop:
                sd = roundtrip({"flex": flex.state_dict(), "model": model.state_dict(), "opt": opt.state_dict()})
                model, opt, flex = make_flex(corpus, LengthMatchedSelector(reference=str(tmp_path), bins=6, seed=1))
                flex.load_state_dict(sd["flex"])
                model.load_state_dict(sd["model"])
                opt.load_state_dict(sd["opt"])
            ids.append(step(flex, model, opt)[0]["sample_id"])
        return torch.stack(ids), flex

    full, flex = run()
    matched = flex.engine.of("selector")
    lengths = sample_lengths(flex.data, torch.arange(len(flex.data)))
    which = length_bins(lengths, 6)
    sel = torch.tensor(export["sample_ids"])
    assert torch.equal(torch.bincount(which[matched.kept_ids], minlength=6), torch.bincount(which[sel], minlength=6))
    assert len(matched.kept_ids) == len(sel)
    assert (flex.data.domain[matched.kept_ids] == code).float().mean() < 0.6
    assert set(full.flatten().tolist()) <= set(matched.kept_ids.tolist())
    resumed, _ = run(stop=2)
    assert torch.equal(full, resumed)
    assert flex.finish()["length_matched_selection.json"]["matched_samples"] == len(sel)
