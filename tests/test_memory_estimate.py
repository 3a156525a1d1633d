"""Issue 20: a memory estimate before the first step. The estimate (dataflex/run/memory.py) counts TinyGPT's
parameters exactly, lies within a factor of the measured peak of a real forward, backward and AdamW step, and
a run that cannot fit is refused with `train: error:` and exit 2 before any data is read."""
import json
import subprocess
import sys

import pytest
from test_launch import ROOT, run

from dataflex.run.memory import (
    GiB,
    estimate,
    hf_shape,
    tinygpt_shape,
    verdict,
)

PY, TRAIN = sys.executable, str(ROOT / "launch" / "train.py")

# one training step of a TinyGPT in a fresh process: the rise of its peak anonymous resident memory (RssAnon,
# sampled every 0.5 ms during the step) over what it held before the step (the weights, the batch). Not
# ru_maxrss: that counts file-backed pages (torch's code) too, which a loaded machine's page cache evicts
# and the step faults back in (it measured 640-706 MiB where the step adds ~300 inside a busy test run)
MEASURE = r"""
import json, resource, sys, torch, torch.nn.functional as F
torch.set_num_threads(1)
from dataflex.models.tiny_gpt import TinyGPT
from dataflex.core.lean_loss import linear_cross_entropy
B, T, H, L, V, lean, packed = [int(x) for x in sys.argv[1:8]]
torch.manual_seed(0)
m = TinyGPT(vocab_size=V, seq_len=T, d_model=H, n_layers=L, n_heads=4)
opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
ids, labels = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))
pos = (torch.arange(T) % (T // 4)).expand(B, T).contiguous() if packed else None    # four samples a row
import threading, time
def anon():     # anonymous resident memory only: file-backed pages (torch's code) come and go with the page cache
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("RssAnon"))
peak, done = [0], threading.Event()
def watch():
    while not done.is_set():
        peak[0] = max(peak[0], anon())
        time.sleep(0.0005)
before = anon()
watcher = threading.Thread(target=watch, daemon=True)
watcher.start()
out = m(ids, position_ids=pos, lean=bool(lean))
if lean:
    loss = linear_cross_entropy(out.hidden, out.head, labels).mean()
else:
    loss = F.cross_entropy(out.float().view(-1, V), labels.view(-1), reduction="none").mean()
loss.backward()
opt.step()
done.set()
watcher.join()
print(json.dumps({"rise": max(peak[0], anon()) - before}))
"""


def measured_rise(B, T, H, L, V, lean, packed) -> int:
    proc = subprocess.run([sys.executable, "-c", MEASURE, *map(str, (B, T, H, L, V, int(lean), int(packed)))],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["rise"]


@pytest.mark.parametrize("d_model,n_layers,lora_rank", [(128, 2, 0), (32, 3, 0), (64, 1, 4)])
def test_tinygpt_parameters_counted_exactly(d_model, n_layers, lora_rank):
    from dataflex.models.tiny_gpt import TinyGPT

    model = TinyGPT(vocab_size=2048, seq_len=96, d_model=d_model, n_layers=n_layers, lora_rank=lora_rank)
    assert tinygpt_shape(2048, 96, d_model, n_layers, 4, lora_rank).params == sum(p.numel() for p in model.parameters())


def test_hf_parameters_counted_from_config_json():
    import transformers
    for tied in (True, False):
        config = transformers.LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=172, num_hidden_layers=3,
                                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
        model = transformers.LlamaForCausalLM(config)
        assert hf_shape(config.to_dict()).params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("B,T,H,L,V,lean,packed", [
    (8, 1024, 128, 2, 2048, True, True),       # the default path: lean loss, packed rows (T^2 mask and scores)
    (8, 512, 64, 2, 8192, False, False),       # trainer.lean_loss=false: the full logits dominate
])
def test_estimate_against_the_measured_peak(B, T, H, L, V, lean, packed):
    """What a step adds (gradients, AdamW state, activations, the loss) against the peak resident memory a real
    step adds: the estimate is an upper bound, within 2x."""
    rise = measured_rise(B, T, H, L, V, lean, packed)
    est = estimate(tinygpt_shape(V, T, H, L, 4), T, B, packing=packed, lean=lean, device="cpu")
    step = est.grads + est.optimizer + est.activations + est.loss
    assert rise > 100 << 20               # large enough to measure
    assert 0.75 * rise <= step <= 2.0 * rise, (step / 2**20, rise / 2**20)   # 1.02-1.07x and 1.05x of the measured rise (RssAnon)


def test_estimate_grows_with_what_matters():
    shape = tinygpt_shape(2048, 4096, 128, 2, 4)
    small, long = estimate(shape, 512, 16), estimate(shape, 4096, 16)
    assert long.activations > 8 * small.activations          # tokens x8, the T^2 terms x64
    logits = estimate(shape, 512, 16, lean=False)
    assert logits.loss == 4 * 512 * 16 * 2048 * 4 > small.loss
    zero = estimate(shape, 512, 16, zero_stage=2, dp_world=4)
    assert zero.optimizer == small.optimizer // 4 and zero.grads == small.grads // 4 and zero.weights == small.weights
    two = estimate(shape, 512, 8, ranks_here=2, new_processes=2)
    assert two.total == 2 * two.per_rank + 2 * (GiB // 2)    # CPU ranks share the machine's RAM


def test_verdict_thresholds():
    est = estimate(tinygpt_shape(2048, 128), 128, 16)
    assert verdict(est, int(est.total / 0.5), seq_len=128, global_batch=16, micro_batch=16) is None
    kind, text = verdict(est, int(est.total / 0.9), seq_len=128, global_batch=16, micro_batch=16)
    assert kind == "warn" and "model.seq_len=128" in text
    kind, text = verdict(est, est.total // 3, seq_len=128, global_batch=16, micro_batch=16)
    assert kind == "refuse" and "3.0x" in text and "trainer.memory_check=false" in text


FAST = ["backend=torch", "logger=none", "model.d_model=32", "trainer.global_batch_size=4", "trainer.max_val_samples=8"]


def test_a_run_that_cannot_fit_is_refused_before_any_data_is_read(tmp_path):
    """model.seq_len=65536: the [B, T, T] attention terms alone are hundreds of GiB. Refused at once, naming
    the seq_len, the batch and the estimate against the available RAM; no data cache made, no run folder."""
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    proc = run([PY, TRAIN, *FAST, "model.seq_len=65536", f"+data.cache={cache}", f"hydra.run.dir={run_dir}"],
               check=False, timeout=180)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = next(x for x in proc.stderr.splitlines() if x.startswith("train: error:"))
    assert line.startswith("train: error: memory: this run needs about "), line
    assert "model.seq_len=65536, trainer.global_batch_size=4 (micro-batch 4 per rank)" in line
    assert "GiB of available RAM (MemAvailable): it would be killed for memory" in line
    assert "Traceback" not in proc.stderr
    assert not cache.exists() and not run_dir.exists()


def test_memory_check_false_lets_the_run_go_on(tmp_path):
    """trainer.memory_check=false: the same run passes the check and stops at the next one, its data (a missing
    input here, so nothing large is ever allocated)."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "missing.yaml").write_text(
        f"tokenizer: {ROOT / 'data' / 'default' / 'tokenizer.json'}\ndomains:\n  a: {{train: {tmp_path / 'nope.jsonl'}}}\n")
    args = [PY, TRAIN, "--config-dir", str(tmp_path), "data=missing", *FAST, "model.seq_len=65536",
            f"hydra.run.dir={tmp_path / 'run'}"]
    proc = run(args, check=False, timeout=180)
    assert proc.returncode == 2 and "train: error: memory: this run needs" in proc.stderr, proc.stderr[-2000:]
    proc = run(args + ["trainer.memory_check=false"], check=False, timeout=180)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "memory:" not in proc.stderr and "input not found" in proc.stderr, proc.stderr[-2000:]
