"""Per-sample gradients: DataFlex's torch.func path against a plain backward, opacus and a loop.

One batch of 16 samples from the default corpus (sequence 128, and its first 64 tokens for seq 64),
a TinyGPT (d_model 128, 2 layers, 4 heads, vocab 2048), and per call:

  plain loss.backward()            the baseline (1.0): one backward of the batch's mean loss
  exact (torch.func)               dataflex.per_sample_grads(model, batch, params="all")
  norms only                       the same call: norms always come with it, so its time and memory
  projected d=1024 / d=8192        the same with RademacherProjector(d): gradients -> [B, d]
  LoRA: plain backward             TinyGPT(lora_rank=8), only the adapters trainable (reference)
  LoRA: exact, params="lora"       per_sample_grads over the adapters only
  LoRA: projected d=8192           the same with a projector (LESS's configuration)
  ghost norms / ghost dots         dataflex.per_sample_grad_norms / per_sample_grad_dots (target: the
                                   batch's mean gradient): one forward + activation backward, exact
  factored d=8192                  FactoredProjector (LoGra): Kronecker-factored, never materialised
  sparse d=8192                    SparseProjector (CountSketch) of exact per-layer gradients (hooks)
  (the same four for the LoRA model, params="lora")
  opacus GradSampleModule, hooks   p.grad_sample from backward hooks
  opacus expanded weights ("ew")   torch's ExpandedWeights through opacus
  loop of 16 single-sample backward  LESS's way

Cheap methods are timed in rounds (one call of each in turn, the order rotating), so a slow spell
of the machine hits them alike; projections cost seconds a call and are timed with fewer calls
(their first call counts: it is dominated by generating the random matrix, not by set-up).
Peak memory is the rise of the process's resident set over the call (Linux VmHWM reset through
/proc/self/clear_refs after malloc_trim; torch's CPU allocator is plain malloc, so every tensor is
seen). Each method's result is checked against a reference (the exact torch.func gradients, or for
LoRA a loop over the adapters) and the largest absolute difference is reported (relative, for the
norms that projected calls return and for ghost norms and dots). Projected features also get their
accuracy: the Pearson correlation of their 120 pairwise cosines with the exact ones.

Projections with d >= 4096 over all parameters cost about a minute a call on 2 cores whatever the
sequence length (generating the P x d random signs dominates): they get one call per sequence
length, and --big-proj-seqs 128 limits them to one length.

    .venv/bin/python bench/bench_grads.py [--rounds 7] [--seqs 64 128] [--proj-dims 1024 8192]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import fmt_ms, fmt_ratio, markdown_table, measure_peak, median_ms  # noqa: E402

torch = common.setup_torch()

from dataflex import (  # noqa: E402
    FactoredProjector,
    MixtureDataset,
    RademacherProjector,
    SparseProjector,
    batch_grad,
    per_sample_grad_dots,
    per_sample_grad_norms,
    per_sample_grads,
)
from dataflex.core.loss import per_sample_loss  # noqa: E402
from dataflex.models.tiny_gpt import TinyGPT  # noqa: E402

BATCH, MAX_SEQ, LORA_RANK, SEED = 16, 128, 8, 0
BASELINE = "plain loss.backward()"
BIG_PROJ = 4096
ENGINE_DIM = 8192


def make_batch(seq: int) -> dict:
    domains = common.load_domains(MAX_SEQ)
    data = MixtureDataset(domains.train)
    ids = torch.randperm(len(data), generator=torch.Generator().manual_seed(SEED))[:BATCH]
    full = data.batch(ids)
    batch = {k: full[k][:, :seq].contiguous() for k in ("input_ids", "labels", "loss_mask")}
    batch["position_ids"] = torch.arange(seq).expand(BATCH, seq).contiguous()
    return batch, domains.tokenizer.vocab_size


def model(vocab: int, lora: bool = False) -> TinyGPT:
    m = TinyGPT(vocab_size=vocab, seq_len=MAX_SEQ, lora_rank=LORA_RANK if lora else 0, seed=SEED, **common.MODEL)
    if lora:
        for name, p in m.named_parameters():
            p.requires_grad_("lora_" in name)
    return m


def mean_loss(m, batch):
    logits = m(batch["input_ids"], position_ids=batch["position_ids"])
    return per_sample_loss(logits, batch["labels"], batch["loss_mask"]).mean()


def trainable(m):
    return [p for p in m.parameters() if p.requires_grad]


# -- the methods -------------------------------------------------------------------------------------
EXACT = "exact per-sample, torch.func (params=all)"
NORMS = "norms only (= the exact call)"
LORA_BACKWARD = "LoRA r=8: plain backward, adapters only"
LORA_EXACT = "LoRA r=8: exact per-sample (params=lora)"


@dataclass
class Method:
    name: str
    call: Optional[Callable]          # -> [B, P] gradients, [B] norms, or None
    ref: Optional[str] = None         # "exact" or "lora": what the result is checked against
    check: str = "grads"              # grads | features (norms + cosines) | norms | dots
    proj_dim: int = 0                 # projections are timed with few calls (they cost seconds)
    calls: int = 0                    # timed calls of a projection (its first call counts)


def methods(vocab: int, batch: dict, proj_dims, lora_proj_dims) -> tuple[list, Callable]:
    base, lora = model(vocab), model(vocab, lora=True)
    exact_model, lora_exact_model, loop_model = model(vocab), model(vocab, lora=True), model(vocab)

    def backward(m):
        def call():
            m.zero_grad(set_to_none=True)
            mean_loss(m, batch).backward()
        return call

    def exact(m, params):
        return lambda: per_sample_grads(m, batch, params=params).flat()

    def projected(m, params, d, make=RademacherProjector):     # -> PerSampleGrads (norms, [B, d] features)
        projector = make(d, seed=SEED)
        return lambda: per_sample_grads(m, batch, params=params, projector=projector)

    def ghost(m, params, what):
        if what == "norms":
            return lambda: per_sample_grad_norms(m, batch, params)
        target = batch_grad(m, batch, params)
        return lambda: per_sample_grad_dots(m, batch, target, params)

    def engine(m, params, prefix, ref):
        return [Method(f"{prefix}ghost norms (params={params})", ghost(m, params, "norms"), ref, check="norms"),
                Method(f"{prefix}ghost dots, batch-mean target (params={params})", ghost(m, params, "dots"), ref,
                       check="dots"),
                Method(f"{prefix}factored d={ENGINE_DIM} (FactoredProjector)",
                       projected(m, params, ENGINE_DIM, FactoredProjector), ref, check="features"),
                Method(f"{prefix}sparse d={ENGINE_DIM} (SparseProjector)",
                       projected(m, params, ENGINE_DIM, SparseProjector), ref, check="features")]

    def loop(m):
        def call():
            out = []
            for i in range(BATCH):
                m.zero_grad(set_to_none=True)
                mean_loss(m, {k: v[i:i + 1] for k, v in batch.items()}).backward()
                out.append(torch.cat([p.grad.flatten() for p in trainable(m)]))
            return torch.stack(out)
        return call

    found = [Method(BASELINE, backward(base)),
             Method(EXACT, exact(exact_model, "all"), "exact"),
             Method(NORMS, None)]
    found += engine(model(vocab), "all", "", "exact")
    found += [Method(f"projected d={d} (RademacherProjector)", projected(exact_model, "all", d), "exact", "features",
                     d, 1 if d >= BIG_PROJ else 2) for d in proj_dims]
    found += [Method(LORA_BACKWARD, backward(lora)),
              Method(LORA_EXACT, exact(lora_exact_model, "lora"), "lora")]
    found += engine(model(vocab, lora=True), "lora", "LoRA r=8: ", "lora")
    found += [Method(f"LoRA r=8: projected d={d} (params=lora)", projected(lora_exact_model, "lora", d), "lora",
                     "features", d, 3) for d in lora_proj_dims]
    try:
        from opacus import GradSampleModule
        from opacus.grad_sample.gsm_exp_weights import GradSampleModuleExpandedWeights

        def opacus(gsm):
            def call():
                gsm.zero_grad(set_to_none=True)
                mean_loss(gsm, batch).backward()
                return torch.cat([p.grad_sample.flatten(1) for p in gsm.parameters()], 1)
            return call

        found += [Method("opacus GradSampleModule (hooks)",
                         opacus(GradSampleModule(model(vocab), batch_first=True, loss_reduction="mean")), "exact"),
                  Method("opacus expanded weights (ew)",
                         opacus(GradSampleModuleExpandedWeights(model(vocab), batch_first=True,
                                                                loss_reduction="mean")), "exact")]
    except ImportError as e:                     # opacus is a dev dependency
        print(f"opacus unavailable, skipped: {e}", file=sys.stderr)
    found += [Method(f"loop of {BATCH} single-sample backwards", loop(loop_model), "exact")]
    targets = {"exact": torch.cat([t.flatten() for t in batch_grad(model(vocab), batch).values()]),
               "lora": torch.cat([t.flatten() for t in batch_grad(model(vocab, lora=True), batch, "lora").values()])}
    return found, loop(model(vocab, lora=True)), targets


def cosine_corr(features: torch.Tensor, exact: torch.Tensor) -> float:
    """Pearson correlation of the pairwise cosines of projected features with the exact ones."""
    def cosines(x):
        x = x.double() / x.double().norm(dim=1, keepdim=True).clamp(min=1e-30)
        iu = torch.triu_indices(len(x), len(x), offset=1)
        return (x @ x.T)[iu[0], iu[1]]
    return float(torch.corrcoef(torch.stack([cosines(features), cosines(exact)]))[0, 1])


def check(m: Method, out, ref: torch.Tensor, target: torch.Tensor) -> dict:
    """The largest difference from the reference (relative for norms and dots), and the accuracy."""
    norms = ref.double().norm(dim=1)                   # a float32 norm over ~1M entries is off by ~1e-4
    if m.check == "features":
        rel = ((out.norms.double() - norms).abs() / norms).max()
        return {"max_abs_diff": float(rel), "checked_against": f"{m.ref} norms, relative",
                "cosine_corr": cosine_corr(out.projected, ref)}
    if m.check == "norms":
        return {"max_abs_diff": float(((out.double() - norms).abs() / norms).max()),
                "checked_against": f"{m.ref} norms, relative"}
    if m.check == "dots":
        want = ref.double() @ target.double()
        return {"max_abs_diff": float(((out.double() - want).abs() / want.abs().max()).max()),
                "checked_against": f"{m.ref} dots, relative"}
    return {"max_abs_diff": float((out - ref).abs().max()),
            "checked_against": "LoRA loop" if m.ref == "lora" else "exact"}


def run_seq(seq: int, rounds: int, proj_dims, lora_proj_dims) -> dict:
    batch, vocab = make_batch(seq)
    started = time.perf_counter()
    found, lora_loop, targets = methods(vocab, batch, proj_dims, lora_proj_dims)
    results, first = {}, {}
    for m in found:                                # first call of each: memory, warm-up, result
        if m.call is None:
            continue
        first[m.name], seconds, peak = measure_peak(m.call)
        results[m.name] = {"peak_rss_mib": peak, "first_call_ms": 1000 * seconds, "times": []}
        if m.proj_dim:                             # seconds a call: the first one counts
            results[m.name]["times"].append(seconds)

    # correctness: the exact gradients for the full model, a loop over the adapters for LoRA
    refs = {"exact": first[EXACT], "lora": lora_loop()}
    for m in found:
        if m.ref is None or m.call is None or m.name == EXACT:
            continue
        results[m.name].update(check(m, first[m.name], refs[m.ref], targets[m.ref]))
    del first, refs

    cheap = [m for m in found if m.call is not None and not m.proj_dim]
    for r in range(rounds):
        k = r % len(cheap)
        for m in cheap[k:] + cheap[:k]:
            start = time.perf_counter()
            m.call()
            results[m.name]["times"].append(time.perf_counter() - start)
    for m in found:
        if m.proj_dim:
            for _ in range(m.calls - 1):
                start = time.perf_counter()
                m.call()
                results[m.name]["times"].append(time.perf_counter() - start)

    base = median_ms(results[BASELINE]["times"])
    base_min = 1000 * min(results[BASELINE]["times"])
    for entry in results.values():
        entry["ms"] = median_ms(entry["times"])
        entry["ms_min"] = 1000 * min(entry["times"])
        entry["ratio"] = entry["ms"] / base
        entry["ratio_min"] = entry["ms_min"] / base_min
        entry["calls_timed"] = len(entry.pop("times"))
    results[NORMS] = {**results[EXACT], "same_as": EXACT}
    for name, entry in results.items():
        if name.startswith("LoRA") and name != LORA_BACKWARD:
            entry["ratio_vs_lora_backward"] = entry["ms"] / results[LORA_BACKWARD]["ms"]
    params = {"all": sum(p.numel() for p in model(vocab).parameters()),
              "lora": sum(p.numel() for p in trainable(model(vocab, lora=True)))}
    return {"seq_len": seq, "batch": BATCH, "params": params,
            "methods": {m.name: results[m.name] for m in found if m.name in results},
            "wall_s": time.perf_counter() - started}


def tables(result: dict) -> str:
    rows = []
    for seq in result["seqs"]:
        for name, e in seq["methods"].items():
            peak = "—" if e.get("peak_rss_mib") is None else f"{e['peak_rss_mib']:.0f}"
            check = "—" if "max_abs_diff" not in e else f"{e['max_abs_diff']:.0e} ({e['checked_against']})"
            corr = f"{e['cosine_corr']:.3f}" if "cosine_corr" in e else "—"
            own = fmt_ratio(e.get("ratio_vs_lora_backward", e["ratio"]))
            rows.append((name, seq["seq_len"], fmt_ms(e["ms"]), fmt_ratio(e["ratio"]), own, fmt_ms(e["ms_min"]),
                         fmt_ratio(e["ratio_min"]), peak, corr, check))
    s0 = result["seqs"][0]
    head = (f"### Per-sample gradients (TinyGPT {s0['params']['all'] / 1e6:.2f}M params, LoRA adapters "
            f"{s0['params']['lora'] / 1e3:.0f}k, batch {BATCH})")
    return "\n".join([head, "", markdown_table(
        ["variant", "seq", "ms/call", "ratio vs backward", "ratio vs own backward", "fastest ms", "fastest ratio",
         "peak RSS Δ MiB", "cosine corr", "check: max |Δ| (against)"], rows)])


def run(rounds: int = 7, seqs=(64, 128), proj_dims=(1024, 8192), big_proj_seqs=None, lora_proj_dims=(8192,),
        ) -> dict:
    """Projections with d >= BIG_PROJ cost about a minute a call on 2 cores whatever the sequence
    length (generating P x d random signs dominates): `big_proj_seqs` (default: all) limits them."""
    warnings.filterwarnings("ignore", message=".*full_backward_hook.*")
    big_proj_seqs = list(seqs) if big_proj_seqs is None else list(big_proj_seqs)
    load = os.getloadavg()
    per_seq = [run_seq(s, rounds, [d for d in proj_dims if d < BIG_PROJ or s in big_proj_seqs],
                       lora_proj_dims) for s in seqs]
    out = {"seqs": per_seq, "rounds": rounds, "big_proj_seqs": big_proj_seqs,
           "baseline": BASELINE, "memory": "peak RSS rise over one call (VmHWM)"
           if common.peak_rss_supported() else "not measured (no /proc/self/clear_refs)"}
    out["loadavg"] = {"start": load, "end": os.getloadavg()}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7, help="timed calls of each cheap method")
    p.add_argument("--seqs", type=int, nargs="+", default=[64, 128])
    p.add_argument("--proj-dims", type=int, nargs="*", default=[1024, 8192])
    p.add_argument("--big-proj-seqs", type=int, nargs="*", default=None,
                   help=f"seq lengths at which projections with d >= {BIG_PROJ} run (default: all)")
    args = p.parse_args(argv)
    print(f"$ {common.command_line()}", flush=True)
    result = run(args.rounds, args.seqs, args.proj_dims, args.big_proj_seqs)
    result["env"] = common.environment()
    print(tables(result))
    print(f"\nsaved {common.save_json('grads.json', result)}")


if __name__ == "__main__":
    main()
