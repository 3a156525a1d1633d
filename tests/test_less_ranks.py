"""LESS on two gloo ranks: the same warm-up pool, the same scores (each rank scores a slice of the
pool, gathered) and the same kept samples on every rank as in one process, and the run goes on
training on them (the session's per-step rank digest checks the ranks agree)."""
import json
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import leave_spawned_group, synthetic_domains, tiny_gpt

from dataflex.data.domains import MixtureDataset
from dataflex.grad.interface import TorchInterface
from dataflex.selectors import LessSelector
from dataflex.session.flex import DataFlex

STEPS, WARMUP = 9, 6


def run_less(out_dir: str, world_size: int) -> dict:
    torch.manual_seed(0)
    model = tiny_gpt(lora_rank=4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, betas=(0.9, 0.95))
    plugin = LessSelector(target="A", warmup_fraction=0.25, warmup_steps=WARMUP, num_checkpoints=2,
                          keep_fraction=0.2, dim=512, target_samples=4, chunk_size=16, progress=False,
                          features_dir=os.path.join(out_dir, "features"))
    val = MixtureDataset(synthetic_domains(n_per_domain=8, seed=1))
    flex = DataFlex(synthetic_domains(n_per_domain=48), global_batch_size=8, plugins=[plugin],
                    interface=TorchInterface(model), seed=0, datasets={"val": val}, optimizer=opt,
                    check_ranks_every=1)
    assert flex.world_size == world_size
    batches, pools = [], []
    for _ in range(STEPS):
        batch = flex.next_batch()
        pools.append([m.clone() for m in flex.state.pool_masks.values()] if flex.state.pool_masks else [])
        loss = flex.loss(model(batch["input_ids"], position_ids=batch["position_ids"]), batch)
        loss.backward()
        for p in model.parameters():            # what DDP does: average the gradients over ranks
            if p.grad is not None and world_size > 1:
                dist.all_reduce(p.grad)
                p.grad /= world_size
        opt.step()
        opt.zero_grad()
        flex.end_step()
        batches.append(batch["sample_id"].clone())
    return {"kept": plugin.kept_ids.clone(), "scores": plugin.scores.clone(), "batches": batches,
            "warmup_pool": pools[0], "exports": plugin.exports(flex.state)}


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        out = run_less(out_dir, 2)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        dist.destroy_process_group()
        raise
    leave_spawned_group()


def test_two_ranks_select_what_one_rank_selects(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = run_less(str(tmp_path / "single"), 1)
    finally:
        torch.set_num_threads(before)
    # every rank: the same warm-up pool, scores and kept ids
    for r in ranks[1:]:
        assert all(torch.equal(a, b) for a, b in zip(r["warmup_pool"], ranks[0]["warmup_pool"]))
        assert torch.equal(r["scores"], ranks[0]["scores"]) and torch.equal(r["kept"], ranks[0]["kept"])
    # two ranks against one: the same warm-up pool, scores within float tolerance, the same top-k set
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["warmup_pool"], single["warmup_pool"]))
    torch.testing.assert_close(ranks[0]["scores"], single["scores"], atol=1e-4, rtol=1e-4)
    assert torch.equal(ranks[0]["kept"], single["kept"]) and len(single["kept"]) == 29
    # after the selection each rank trains on its share of kept samples
    kept = set(single["kept"].tolist())
    for step in range(WARMUP + 1, STEPS):
        drawn = torch.cat([r["batches"][step] for r in ranks])
        assert set(drawn.tolist()) <= kept and len(drawn) == 8
    # the gathered features on disk: every pool row written, as in one process
    feats = np.load(tmp_path / "features" / "checkpoint_1_train.npy")
    ref = np.load(tmp_path / "single" / "features" / "checkpoint_1_train.npy")
    assert feats.shape == ref.shape == (144, 512)
    np.testing.assert_allclose(feats.astype(np.float32), ref.astype(np.float32), atol=2e-3)
    assert json.loads((tmp_path / "features" / "checkpoint_1.json").read_text())["done"] == 144
    sel = [r["exports"]["less_selection.json"] for r in (ranks[0], single)]
    assert sel[0]["sample_ids"] == sel[1]["sample_ids"]
