"""A user's own DeepSpeed JSON: `backend.config=PATH` (or `--deepspeed_config PATH`) is used as it is, dataflex
fills only the batch sizes it owns and refuses a file that contradicts them, naming both."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_launch import FAST, run  # noqa: E402

from dataflex.backends import DeepSpeedBackend, build_backend  # noqa: E402
from dataflex.backends.deepspeed import deepspeed_config  # noqa: E402
from dataflex.models.tiny_gpt import TinyGPT  # noqa: E402
from dataflex.run.launching import prepare_argv  # noqa: E402
from dataflex.utils.errors import ConfigError  # noqa: E402

os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # DeepSpeed's ninja

ZERO2 = {"zero_optimization": {"stage": 2, "reduce_bucket_size": 120000, "allgather_bucket_size": 240000,
                               "overlap_comm": False, "contiguous_gradients": True},
         "gradient_clipping": 0.5, "bf16": {"enabled": False}, "train_micro_batch_size_per_gpu": "auto"}
ZERO3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                               "offload_optimizer": {"device": "none"}, "offload_param": {"device": "none"}},
         "train_batch_size": 8}


def test_the_file_is_kept_and_only_batch_sizes_are_filled():
    cfg = deepspeed_config(ZERO2, global_batch_size=8, world_size=2, grad_clip=1.0)
    assert cfg["zero_optimization"] == ZERO2["zero_optimization"]          # stage, buckets as given
    assert cfg["gradient_clipping"] == 0.5 and cfg["bf16"] == {"enabled": False}
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) \
        == (8, 4, 1)
    assert ZERO2["train_micro_batch_size_per_gpu"] == "auto"                 # the user's dict is not changed
    filled = deepspeed_config({}, 8, 1, grad_clip=0.7, zero_stage=1, bf16=True)
    assert filled["zero_optimization"] == {"stage": 1} and filled["bf16"]["enabled"] and filled["gradient_clipping"] == 0.7


@pytest.mark.parametrize("user,match", [
    ({"train_batch_size": 16}, r"train_batch_size=16 in the DeepSpeed config contradicts dataflex's train_batch_size=8"),
    ({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2},
     r"train_micro_batch_size_per_gpu=2 .* contradicts dataflex's train_micro_batch_size_per_gpu=4"),
    ({"gradient_accumulation_steps": 4}, r"gradient_accumulation_steps=4 .* contradicts"),
])
def test_contradicting_batch_sizes_are_refused_naming_both(user, match):
    with pytest.raises(ConfigError, match=match):
        deepspeed_config(user, global_batch_size=8, world_size=2)


def test_contradicting_stage_or_bf16_is_refused():
    with pytest.raises(ConfigError, match=r"backend.zero_stage=1 contradicts zero_optimization.stage=2"):
        deepspeed_config(ZERO2, 8, 1, zero_stage=1)
    with pytest.raises(ConfigError, match=r"backend.bf16=true contradicts bf16.enabled=false"):
        deepspeed_config(ZERO2, 8, 1, bf16=True)


def test_deepspeed_config_flag_becomes_backend_config(tmp_path):
    path = tmp_path / "ds.json"
    assert prepare_argv(["--deepspeed_config", str(path), "+mixer=bandit"])[0] == f"backend.config={path}"
    assert prepare_argv([f"--deepspeed_config={path}", "--deepspeed"]) == [f"backend.config={path}"]


def _steps(backend, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(n):
        ids = torch.randint(0, 64, (8, 17), generator=g)
        batch = backend.to_device({"input_ids": ids[:, :-1], "position_ids": torch.arange(16).expand(8, 16)})
        logits = backend.forward(batch)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 64).float(), ids[:, 1:].reshape(-1))
        backend.step(loss)
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("user,stage", [(ZERO2, 2), (ZERO3, 3)])
def test_a_real_engine_trains_with_the_users_file(tmp_path, user, stage):
    """ZeRO-2 (its buckets) and ZeRO-3 files on a real DeepSpeed engine (CPU): the engine runs the file's
    stage and settings, the batch sizes are dataflex's, and it trains (the loss goes down on a fixed batch)."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    torch.manual_seed(0)
    backend = build_backend("deepspeed", TinyGPT(vocab_size=64, seq_len=16, d_model=32, n_layers=2, n_heads=4),
                            8, 1, options={"name": "deepspeed", "config": str(path)}, lr=1e-2, warmup_steps=0,
                            max_steps=10, grad_clip=1.0, zero_stage=0, bf16=False)
    assert isinstance(backend, DeepSpeedBackend)
    engine = backend.engine
    assert engine.zero_optimization_stage() == stage
    assert (engine.train_batch_size(), engine.train_micro_batch_size_per_gpu(),
            engine.gradient_accumulation_steps()) == (8, 8, 1)
    if stage == 2:
        assert engine.zero_reduce_bucket_size() == 120000 and engine.zero_allgather_bucket_size() == 240000
        assert engine.gradient_clipping() == 0.5
    losses = [_steps(backend, 1, seed=5)[0] for _ in range(4)]      # the same batch four times
    assert losses[-1] < losses[0]
    assert backend.interface.device == engine.device
    assert backend.interface.probe({"input_ids": torch.zeros(2, 16, dtype=torch.long),
                                    "labels": torch.zeros(2, 16, dtype=torch.long), "loss_mask": torch.ones(2, 16),
                                    "position_ids": torch.arange(16).expand(2, 16)}).shape == (2,)


def test_launch_refuses_a_contradicting_file_before_any_data(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 32, "zero_optimization": {"stage": 2}}))
    proc = run([sys.executable, "launch/train.py", "--deepspeed_config", str(path), "logger=none", *FAST,
                f"hydra.run.dir={tmp_path / 'run'}"], check=False)
    assert proc.returncode == 2, proc.stderr
    assert "train: error: backend.config=" in proc.stderr
    assert "train_batch_size=32 in the DeepSpeed config contradicts dataflex's train_batch_size=8" in proc.stderr
    missing = run([sys.executable, "launch/train.py", "backend.config=/nonexistent/ds.json", "logger=none", *FAST,
                   f"hydra.run.dir={tmp_path / 'run2'}"], check=False)
    assert missing.returncode == 2 and "no such DeepSpeed config file" in missing.stderr


def test_launch_trains_with_the_users_zero2_file(tmp_path):
    """`python launch/train.py backend=deepspeed backend.config=ds.json` end to end (one process, CPU)."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ZERO2))
    run([sys.executable, "launch/train.py", "backend=deepspeed", f"backend.config={path}", "+mixer=bandit",
         "logger=none", *FAST, "trainer.max_steps=2", "trainer.eval_every=2", f"hydra.run.dir={tmp_path / 'run'}"])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["backend"] == "deepspeed"
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert f"config: {path}" in saved
