"""Issue 20: files the user names are read, never executed. A crafted checkpoint (a pickle whose
`__reduce__` makes a marker folder when unpickled) is refused by every loader with a message naming the
file, and the marker never appears. The payload itself is checked to work under full unpickling, so
each test would fail if its loader unpickled."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from test_launch import ROOT, run

from dataflex.grad.params import PerSampleGrads
from dataflex.run.checkpoints import mark_complete
from dataflex.run.reference import load_model_weights
from dataflex.utils.errors import UserError
from dataflex.utils.safeload import UnsafeFileError, load_weights_only

PY = sys.executable


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def craft(path: Path, marker: Path, key: str = "model") -> Path:
    """A torch file that looks like a checkpoint and runs `os.makedirs(marker)` when fully unpickled."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({key: {"w": torch.zeros(2)}, "payload": Payload(marker)}, path)
    return path


def test_the_payload_runs_under_full_unpickling(tmp_path):
    marker = tmp_path / "pwned"
    torch.load(craft(tmp_path / "x.pt", marker), weights_only=False)
    assert marker.is_dir()


def refused(fn, marker: Path, path: Path):
    with pytest.raises(UnsafeFileError) as e:
        fn()
    msg = str(e.value)
    assert isinstance(e.value, UserError)
    assert str(path) in msg and "refused: not a weights-only file" in msg and "os.makedirs" in msg, msg
    assert not marker.exists()
    return msg


def test_load_weights_only_refuses(tmp_path):
    marker = tmp_path / "pwned"
    path = craft(tmp_path / "x.pt", marker)
    refused(lambda: load_weights_only(path, "file"), marker, path)


def test_per_sample_grads_load_refuses_and_reads_its_own(tmp_path):
    marker = tmp_path / "pwned"
    path = craft(tmp_path / "features.pt", marker)
    refused(lambda: PerSampleGrads.load(path), marker, path)
    own = PerSampleGrads(norms=torch.ones(3), projected=torch.randn(3, 4),
                         projector={"kind": "sparse", "dim": 4, "seed": 0})
    own.save(tmp_path / "own.pt", torch.arange(3), step=5)
    back = PerSampleGrads.load(tmp_path / "own.pt")
    assert torch.equal(back["features"], own.projected) and back["step"] == 5


@pytest.mark.parametrize("name", ["state.pt", "mp_rank_00_model_states.pt"])
def test_reference_model_refuses(tmp_path, name):
    """rho1 / rho / doremi's `reference=RUN_DIR`: the torch back end's state.pt and DeepSpeed's model file."""
    marker = tmp_path / "pwned"
    path = craft(tmp_path / "ckpt" / name, marker, "model" if name == "state.pt" else "module")
    msg = refused(lambda: load_model_weights(tmp_path / "ckpt"), marker, path)
    assert msg.startswith("reference model: checkpoint file")


@pytest.mark.parametrize("name", ["state.pt", "mp_rank_00_model_states.pt"])
def test_score_refuses(tmp_path, name):
    import dataflex.recipes.score as score      # what launch/score.py and `dataflex score` run
    marker = tmp_path / "pwned"
    path = craft(tmp_path / "ckpt" / name, marker, "model" if name == "state.pt" else "module")
    refused(lambda: score.load_checkpoint(tmp_path / "ckpt"), marker, path)


def test_deepspeed_resume_checks_before_the_engine_unpickles(tmp_path):
    from dataflex.backends.deepspeed import DeepSpeedBackend

    calls = []

    class Engine:
        def load_checkpoint(self, *a, **k):
            calls.append(a)
            return None, {"dataflex": {}}

    backend = object.__new__(DeepSpeedBackend)
    backend.engine = Engine()
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "checkpoints" / "step_0000002"
    path = craft(ckpt / "mp_rank_00_model_states.pt", marker, "module")
    refused(lambda: backend.load(ckpt), marker, path)
    assert calls == []                      # DeepSpeed never saw the file
    torch.save({"module": {"w": torch.zeros(2)}, "dataflex": {"rng": torch.zeros(3)}}, path)
    # a ZeRO 1-2 optimizer file holds DeepSpeed's own data classes: those pass (the ones a real ZeRO-2 save wrote)
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    torch.save({"optimizer_state_dict": {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum(2),
                                         "param_slice_mappings": [{"w": fragment_address(numel=2, start=0)}]}},
               ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert backend.load(ckpt) == {} and len(calls) == 1     # a plain checkpoint goes through
    craft(ckpt / "zero_pp_rank_1_mp_rank_00_optim_states.pt", marker, "optimizer_state_dict")
    refused(lambda: backend.load(ckpt), marker, ckpt / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    assert len(calls) == 1


def test_megatron_resume_refuses(tmp_path):
    from dataflex.backends.megatron.backend import MegatronBackend

    backend = object.__new__(MegatronBackend)
    backend.device = "cpu"
    backend._shard_file = lambda p: p / "megatron_tp00_pp00.pt"
    marker = tmp_path / "pwned"
    path = craft(tmp_path / "ckpt" / "megatron_tp00_pp00.pt", marker)
    refused(lambda: backend.load(tmp_path / "ckpt"), marker, path)

    class Sink:
        def load_state_dict(self, sd):
            pass

    backend.module = backend.optimizer = Sink()
    torch.save({"model": {}, "optimizer": {}}, path)      # a plain shard; then dataflex's own meta file
    meta = craft(tmp_path / "ckpt" / "dataflex.pt", marker, "client")
    refused(lambda: backend.load(tmp_path / "ckpt"), marker, meta)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step torch-backend run with a checkpoint at step 2."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    run([PY, str(ROOT / "launch" / "train.py"), "backend=torch", "logger=none", "trainer.max_steps=2",
         "trainer.eval_every=2", "trainer.global_batch_size=8", "trainer.max_val_samples=8", "model.d_model=32",
         "model.seq_len=64", "trainer.checkpoint_every=2", "trainer.plot=false", f"hydra.run.dir={run_dir}"],
        timeout=300)
    return run_dir


def test_resume_from_a_crafted_checkpoint_exits_2(tmp_path, trained):
    """Through launch/train.py: `trainer.resume=` a checkpoint whose state.pt was replaced."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    ckpt = run_dir / "checkpoints" / "step_0000002"
    state = torch.load(ckpt / "state.pt", weights_only=True)   # dataflex's own checkpoint loads weights-only
    assert set(state) == {"model", "optimizer", "scheduler", "client"}
    marker = tmp_path / "pwned"
    craft(ckpt / "state.pt", marker)
    mark_complete(ckpt, 2)
    proc = run([PY, str(ROOT / "launch" / "train.py"), "trainer.resume=latest", "trainer.max_steps=4",
                f"hydra.run.dir={run_dir}"], check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"train: error: trainer.resume: checkpoint file {ckpt / 'state.pt'}: refused: not a weights-only file" \
        in proc.stderr
    assert "Traceback" not in proc.stderr and not marker.exists()
