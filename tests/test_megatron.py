"""backend=megatron: Megatron-core's GPTModel, schedule and optimizer with dataflex's sampler, loss
wrapper and plugins (on CPU through the device shim in dataflex/backends/megatron_cpu.py)."""
import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import megatron.core  # noqa: E402,F401  (required: a broken install fails here, never skips)
from test_launch import FAST, check_outputs, run  # noqa: E402

from dataflex.core.loss import LossWrapper, per_sample_loss  # noqa: E402
from dataflex.models.tiny_gpt import TinyGPT  # noqa: E402
from dataflex.utils import dist  # noqa: E402

SIZES = dict(vocab_size=96, seq_len=16, d_model=32, n_layers=2, n_heads=4)


@pytest.fixture
def megatron_backend():
    from dataflex.backends import build_backend
    made = []

    def make(global_batch_size=8, seed=0, **options):
        b = build_backend("megatron", TinyGPT(**SIZES), global_batch_size, 1, options={"name": "megatron", **options},
                          seed=seed, lr=1e-3, warmup_steps=0, max_steps=10)
        made.append(b)
        return b
    yield make
    dist.use_group(None)


def _batch(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, SIZES["vocab_size"], (n, SIZES["seq_len"] + 1), generator=g)
    mask = torch.ones(n, SIZES["seq_len"])
    mask[0, :5] = 0            # a prompt
    mask[3, 10:] = 0           # padding
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": mask,
            "position_ids": torch.arange(SIZES["seq_len"]).expand(n, -1),
            "sample_id": torch.arange(n), "domain": torch.zeros(n, dtype=torch.long)}


def test_per_sample_losses_equal_plain_forward_of_the_same_weights(megatron_backend):
    """Probe through Megatron's schedule (forward only) == a plain forward of the same GPTModel module
    with dataflex's per-sample loss (what the torch back end computes), and the training step's
    loss_func sees the same per-sample losses."""
    from dataflex.backends.megatron.backend import gpt_forward
    from dataflex.backends.megatron.cpu_shim import cpu_device
    from dataflex.grad.interface import TorchInterface

    backend = megatron_backend()
    batch = _batch()
    probed = backend.interface.probe(batch, "loss")
    with cpu_device(), torch.no_grad():
        backend.module.eval()
        plain = per_sample_loss(gpt_forward(backend.module, batch), batch["labels"], batch["loss_mask"])
        torch_iface = TorchInterface(backend.module, forward=gpt_forward).per_sample_loss(batch)
    assert probed.shape == (8,)
    torch.testing.assert_close(probed, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(probed, torch_iface, rtol=1e-5, atol=1e-5)

    seen = {}
    wrapper = LossWrapper(weigh=lambda signal, b: seen.update(signal) or None)
    loss = backend.forward_backward(batch, wrapper)
    torch.testing.assert_close(seen["loss"], plain, rtol=1e-5, atol=1e-5)
    expected = (plain * batch["loss_mask"].sum(-1)).sum() / batch["loss_mask"].sum()    # the token mean
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


def test_micro_batches_give_the_same_weighted_step(megatron_backend):
    """Several micro-batches (weigh the whole batch first, then train on per-token coefficients)
    give the loss and the gradients of one micro-batch with the same sample weights."""
    weights = torch.tensor([0.0, 1, 2, 0.5, 1, 3, 1, 0.25])

    def weigh(signal, b):
        return {"sample_weights": weights}
    results = []
    for micro in (None, 2):
        backend = megatron_backend(micro_batch_size=micro)
        loss = backend.forward_backward(_batch(), LossWrapper(weigh=weigh))
        grads = {n: p.main_grad.clone() for n, p in backend.module.named_parameters()}
        results.append((loss, grads))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    for name in results[0][1]:
        torch.testing.assert_close(results[0][1][name], results[1][1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_per_sample_grads_name_the_layout_or_work(megatron_backend):
    backend = megatron_backend()
    batch = _batch(4)
    try:      # torch.func cannot vmap Megatron's autograd Functions: dataflex's exact per-sample loop (a warning)
        with pytest.warns(UserWarning, match="per-sample"):
            g = backend.interface.per_sample_grads(batch, params=r"decoder\.(final_layernorm|layers\.1\.mlp)")
    except NotImplementedError as e:
        pytest.fail(f"TP=PP=1 should give per-sample gradients: {e}")
    assert all(v.shape[0] == 4 for v in g.grads.values()) and g.norms.shape == (4,)
    from dataflex.backends.megatron.backend import gpt_forward
    from dataflex.backends.megatron.cpu_shim import cpu_device
    module = backend.module
    names = list(g.grads)
    params = [dict(module.named_parameters())[n] for n in names]
    with cpu_device():                       # sample 2 alone, by a plain autograd.grad
        one = {k: v[2:3] for k, v in batch.items()}
        alone = torch.autograd.grad(per_sample_loss(gpt_forward(module, one), one["labels"], one["loss_mask"]).sum(),
                                    params)
    for name, want in zip(names, alone):
        torch.testing.assert_close(g.grads[name][2], want, rtol=1e-4, atol=1e-6)
    backend.tp = 2           # what a tensor-parallel rank would say
    with pytest.raises(NotImplementedError, match="tensor_model_parallel_size=2"):
        backend.interface.per_sample_grads(batch)


def _megatron_run(tmp_path, *extra, nprocs=1, check=True):
    launcher = [sys.executable, "launch/train.py"] if nprocs == 1 else \
        [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", str(nprocs), "launch/train.py"]
    return run(launcher + ["backend=megatron", "logger=none", *FAST, *extra, f"hydra.run.dir={tmp_path}"], check=check)


def _assert_trains(run_dir, ranks={0}):
    ledger, summary = check_outputs(run_dir, 6, 8, ranks, wandb=False)
    assert summary["backend"] == "megatron"
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "train_loss" in x]
    assert steps[-1]["train_loss"] < steps[0]["train_loss"]
    assert sum(summary["val_loss"].values()) < sum(summary["val_loss_initial"].values())
    assert steps[-1]["domain_weights"] != steps[0]["domain_weights"]
    return ledger, summary


def test_launch_trains_one_process(tmp_path):
    _megatron_run(tmp_path, "+mixer=bandit", "trainer.lr=1e-2", "trainer.warmup_steps=1")
    _assert_trains(tmp_path, {0})


LAYOUT_RUN = ("+mixer=bandit", "+reweighter=loss", "reweighter.burnout_steps=2", "trainer.lr=1e-2", "trainer.warmup_steps=1")


@pytest.fixture(scope="module")
def one_process_ledger(tmp_path_factory):
    """The layouts below train the same model from the same seed on the same global batches: their
    ledgers (samples, weights, losses) match this one-process run's to float tolerance."""
    run_dir = tmp_path_factory.mktemp("one_process")
    _megatron_run(run_dir, *LAYOUT_RUN)
    return pd.read_parquet(run_dir / "ledger")


def _same_trajectory(ledger, reference):
    a, b = (x.sort_values(["step", "sample_id"]).reset_index(drop=True) for x in (ledger, reference))
    assert (a.sample_id == b.sample_id).all() and (a.selected == b.selected).all()
    assert (a.loss - b.loss).abs().max() < 2e-3 and (a.weight - b.weight).abs().max() < 2e-3


@pytest.mark.slow
@pytest.mark.parametrize("layout", [
    ("backend.tensor_model_parallel_size=2",),
    ("backend.pipeline_model_parallel_size=2",),
    ("backend.pipeline_model_parallel_size=2", "backend.micro_batch_size=2"),      # 1F1B over 4 micro-batches
    ("backend.use_distributed_optimizer=true", "backend.micro_batch_size=2"),      # data parallel, 2 ranks
], ids=["tp2", "pp2", "pp2-microbatches", "dp2-distopt"])
def test_two_process_layouts_train_like_one_process(tmp_path, layout, one_process_ledger):
    """TP=2 / PP=2 / DP=2 on two CPU processes: train with the bandit and the loss reweighter, the
    per-sample statistics reach every rank's plugins (rank 0 writes the ledger; under PP it is the
    first stage, which only sees losses broadcast from the last), and the trajectory equals one process."""
    _megatron_run(tmp_path, *layout, *LAYOUT_RUN, nprocs=2)
    data_parallel = not any("model_parallel_size" in o for o in layout)
    ledger, summary = _assert_trains(tmp_path, {0, 1} if data_parallel else {0})
    assert summary["world_size"] == 2
    late = ledger[ledger.selected & (ledger.step >= 2)].groupby("step").weight
    assert (late.mean().round(6) == 1).all() and (late.std() > 0).all()     # the reweighter got the losses
    _same_trajectory(ledger, one_process_ledger)


@pytest.mark.slow
@pytest.mark.parametrize("layout,nprocs", [((), 1), (("backend.pipeline_model_parallel_size=2", "+selector=loss"), 2)],
                         ids=["one-process", "pp2-selector"])
def test_resume_continues_exactly(tmp_path, layout, nprocs, monkeypatch):
    """Killed by SIGKILL inside step 5 (DATAFLEX_FAULT), then `trainer.resume=latest` in the same folder: the
    ledger equals the uninterrupted run's, bit for bit (per pipeline stage a shard file, the data state beside)."""
    common = ["+mixer=bandit", "+reweighter=loss", "reweighter.burnout_steps=1", "trainer.max_steps=8",
              "trainer.checkpoint_every=4", *layout]
    _megatron_run(tmp_path / "full", *common, nprocs=nprocs)
    monkeypatch.setenv("DATAFLEX_FAULT", "step:5")
    killed = _megatron_run(tmp_path / "killed", *common, nprocs=nprocs, check=False)
    assert killed.returncode != 0 and not (tmp_path / "killed" / "summary.json").exists(), "the fault did not fire"
    ckpt = tmp_path / "killed" / "checkpoints" / "step_0000004"
    assert (ckpt / "dataflex.pt").is_file() and len(list(ckpt.glob("megatron_tp*_pp*.pt"))) == nprocs
    monkeypatch.delenv("DATAFLEX_FAULT")
    _megatron_run(tmp_path / "killed", *common, "trainer.resume=latest", nprocs=nprocs)
    order = ["step", "rank", "selected", "sample_id"]
    full, resumed = (pd.read_parquet(tmp_path / name / "ledger").sort_values(order, kind="stable")
                     .reset_index(drop=True) for name in ("full", "killed"))
    pd.testing.assert_frame_equal(full, resumed, check_exact=True)


# The documentation's Megatron-core drop-in (docs/integrations/megatron.md: a complete program, Megatron-core's own
# set-up and the dataflex loop) runs as printed in tests/test_docs.py.
