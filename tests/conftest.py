"""Shared fixtures for the dataflex core tests: a tiny model, padded synthetic batches, toy domains."""
from __future__ import annotations

import hashlib
import io
import os
import sys

import pytest
import torch

from dataflex.data.samples import SampleSet
from dataflex.models.tiny_gpt import TinyGPT

# torch caches JIT-built extensions (DeepSpeed's CPU comm op) per Python version and accelerator, not per
# environment, and rebuilds one whose build flags changed: two checkouts' suites at once, each with its own venv,
# would rebuild each other's op at every DeepSpeed start (minutes each on loaded cores). One cache per venv.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(
    os.path.expanduser("~/.cache/torch_extensions"), "venv-" + hashlib.sha1(sys.prefix.encode()).hexdigest()[:12]))

VOCAB, SEQ = 64, 16
TINY = dict(vocab_size=VOCAB, seq_len=SEQ, d_model=32, n_layers=2, n_heads=4)


def roundtrip(obj):
    """Through torch.save/torch.load, as a checkpoint would go."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def tiny_gpt(**overrides) -> TinyGPT:
    return TinyGPT(**{**TINY, **overrides})


@pytest.fixture
def tiny_model() -> TinyGPT:
    return tiny_gpt()


def build_batch(lengths=(16, 11, 7, 3, 16, 9), prompts=(0, 4, 2, 0, 15, 8), seed: int = 0,
                vocab: int = VOCAB, seq_len: int = SEQ, pad_id: int = 0) -> dict:
    """A padded batch: sample i has `lengths[i]` real tokens, the first `prompts[i]` of them a prompt
    (labels present but masked out); everything after the length is padding (masked, pad ids).
    Defaults mix full, short, prompt-only-but-one and unmasked samples."""
    g = torch.Generator().manual_seed(seed)
    B, T = len(lengths), seq_len
    stream = torch.randint(1, vocab, (B, T + 1), generator=g)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(B, T)
    for i, (n, p) in enumerate(zip(lengths, prompts)):
        assert 0 <= p < n <= T
        input_ids[i, :n] = stream[i, :n]
        labels[i, :n] = stream[i, 1:n + 1]
        loss_mask[i, p:n] = 1.0
    return {"input_ids": input_ids, "labels": labels, "loss_mask": loss_mask,
            "position_ids": torch.arange(T).expand(B, T).contiguous(),
            "sample_id": torch.arange(B), "domain": torch.zeros(B, dtype=torch.long),
            "lengths": torch.tensor(lengths)}


@pytest.fixture
def batch_builder():
    return build_batch


def synthetic_domains(n_per_domain: int = 48, seq_len: int = SEQ, vocab: int = VOCAB, seed: int = 0) -> dict:
    """Three domains of SampleSets. A: periodic tokens (easy); B: uniformly random tokens
    (unlearnable); C: a learnable deterministic rule x_{t+1} = (5 x_t + 3) mod V from a random start.
    The last sample of every domain is short and padded, so padding reaches every code path."""
    g = torch.Generator().manual_seed(seed)
    n = n_per_domain

    def to_set(seqs: torch.Tensor) -> SampleSet:
        inputs, labels = seqs[:, :-1].clone(), seqs[:, 1:].clone()
        mask = torch.ones(n, seq_len, dtype=torch.bool)
        inputs[-1, seq_len // 2:] = 0
        labels[-1, seq_len // 2:] = 0
        mask[-1, seq_len // 2:] = False
        return SampleSet(inputs, labels, mask, [f"doc{i}" for i in range(n)], [0] * n)

    period = torch.tensor([3, 9, 14, 20])
    phase = torch.randint(0, 4, (n, 1), generator=g)
    a = period[(phase + torch.arange(seq_len + 1)) % 4]
    b = torch.randint(1, vocab, (n, seq_len + 1), generator=g)
    c = torch.empty(n, seq_len + 1, dtype=torch.long)
    c[:, 0] = torch.randint(1, vocab, (n,), generator=g)
    for t in range(seq_len):
        c[:, t + 1] = (5 * c[:, t] + 3) % vocab
    return {"A": to_set(a), "B": to_set(b), "C": to_set(c)}


@pytest.fixture
def domains_builder():
    return synthetic_domains


def train_steps(flex, model, steps: int, lr: float = 1e-2) -> list:
    """`steps` DataFlex steps of Adam on `model`; returns each step's global batch ids."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    kept = []
    for _ in range(steps):
        batch = flex.next_batch()
        flex.loss(model(batch["input_ids"], position_ids=batch["position_ids"]), batch).backward()
        opt.step()
        opt.zero_grad()
        flex.end_step()
        kept.append(flex.state.batch_ids.clone())
    return kept


def step(flex, model, opt):
    """One training step of a session with its own optimizer: the batch and what end_step returned."""
    batch = flex.next_batch()
    loss = flex.loss(model(batch["input_ids"], position_ids=batch["position_ids"]), batch)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return batch, flex.end_step()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is fastest, and far faster on a shared, loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def leave_spawned_group() -> None:
    """The end of an `mp.spawn` rank: ranks meet, the group is destroyed, and the process leaves without the
    interpreter's teardown. After a step raised on every rank, that teardown aborted in gloo's threads
    ("terminate called without an active exception") in about 1 exit in 20 on 2 CPU ranks, though the group
    was destroyed; with this exit, 0 in 60 (tests/test_session.py)."""
    import os
    import sys

    import torch.distributed as dist
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def script_env() -> dict:
    """The environment of a test's script run by torchrun or python: the repository and tests/ importable, one
    thread, no process-group variables left from another test."""
    import os
    from pathlib import Path

    tests = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests)]), "OMP_NUM_THREADS": "1",
           "PYTHONFAULTHANDLER": "1"}      # a rank that aborts prints where its threads were (in the test's stderr)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def launch_in_group(cmd: list, env: dict, timeout: float):
    """Runs `cmd` in its own process group: a hang kills the launcher and every rank it started."""
    import os
    import subprocess

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def assert_bf16_grads_close(g0: dict, g1: dict, tol: float = 2e-2) -> None:
    """bf16 gradients `g1` against the reference `g0`: relative to each parameter's gradient, or to 1% of the
    largest one for gradients that are ~0 in exact arithmetic (the attention keys' bias: softmax is
    shift-invariant), where bf16 noise is all there is."""
    scale = max(float(g.float().norm()) for g in g0.values())
    for name in g0:
        assert g1[name].dtype == torch.bfloat16
        err = (g1[name].float() - g0[name].float()).norm() / max(float(g0[name].float().norm()), 1e-2 * scale)
        assert err < tol, (name, float(err))

