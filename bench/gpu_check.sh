#!/usr/bin/env bash
# The GPU check (issue 23): a few minutes of one GPU. Run from the repository root:
#
#     OUT=/tmp/gpu_check bash bench/gpu_check.sh        # results: $OUT/gpu_check.json and one table
#
# It installs nothing. Each step has its own time limit and its exit code, seconds and log are recorded;
# a failing step does not stop the others. Without CUDA it writes {"skipped": ...} and exits 0.
#   1. tests/test_devices.py (the host-coloured batches on CPU, and the same paths with the model on CUDA)
#   2. launch/train.py, 20 steps with all three families and validation: backend=torch, backend=deepspeed
#      (one process, DS_ACCELERATOR=cuda), backend=megatron
#   3. host synchronisations per step (bench/gpu_sync_count.py: plain loop, dataflex without plugins, each family)
#   4. the lean loss at V=128k, seq 1024 (bench/bench_lean_loss.py)
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu_check}"
PY="${PYTHON:-python}"
mkdir -p "$OUT"
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo '{"skipped": "no CUDA device"}' > "$OUT/gpu_check.json"
    echo "gpu_check: no CUDA device: skipped"
    exit 0
fi
export WANDB_MODE=offline HYDRA_FULL_ERROR=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset DS_ACCELERATOR
RESULTS="$OUT/steps.jsonl"
: > "$RESULTS"

step() {   # step NAME LIMIT_S COMMAND...
    local name="$1" limit="$2"; shift 2
    local start end rc
    start=$(date +%s.%N)
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    end=$(date +%s.%N)
    "$PY" -c "import json,sys; print(json.dumps({'step': sys.argv[1], 'rc': int(sys.argv[2]), 'seconds': round(float(sys.argv[4]) - float(sys.argv[3]), 1)}))" \
        "$name" "$rc" "$start" "$end" >> "$RESULTS"
    echo "gpu_check: $name rc=$rc"
}

TRAIN=(launch/train.py logger=none +mixer=bandit +selector=loss +reweighter=loss reweighter.burnout_steps=5
       trainer.max_steps=20 trainer.eval_every=10 trainer.global_batch_size=16 trainer.max_val_samples=16
       trainer.plot=false)

step devices 180 "$PY" -m pytest -q -x tests/test_devices.py
step train_torch 120 "$PY" "${TRAIN[@]}" backend=torch "hydra.run.dir=$OUT/run_torch"
DS_ACCELERATOR=cuda step train_deepspeed 150 "$PY" "${TRAIN[@]}" backend=deepspeed "hydra.run.dir=$OUT/run_deepspeed"
step train_megatron 150 "$PY" "${TRAIN[@]}" backend=megatron backend.micro_batch_size=8 "hydra.run.dir=$OUT/run_megatron"
step sync_count 120 bash -c "\"$PY\" bench/gpu_sync_count.py > \"$OUT/sync_count.json\""
step lean_loss 240 "$PY" bench/bench_lean_loss.py --vocab 128256 --seq 1024 --repeats 2 --out gpu_lean_loss.json
cp bench/results/gpu_lean_loss.json "$OUT/lean_loss.json" 2>/dev/null

"$PY" - "$OUT" <<'PY'
import json, pathlib, sys
import torch
out = pathlib.Path(sys.argv[1])
steps = [json.loads(l) for l in (out / "steps.jsonl").read_text().splitlines() if l.strip()]
report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "steps": steps}
for name in ("sync_count", "lean_loss"):
    p = out / f"{name}.json"
    if p.is_file():
        try:
            report[name] = json.loads(p.read_text().strip().splitlines()[-1] if name == "sync_count" else p.read_text())
        except (ValueError, IndexError):
            report[name] = None
for run in ("torch", "deepspeed", "megatron"):
    p = out / f"run_{run}" / "summary.json"
    if p.is_file():
        s = json.loads(p.read_text())
        report[f"train_{run}"] = {"steps": s.get("steps"), "wall_time_s": s.get("wall_time_s"), "val_loss": s.get("val_loss")}
(out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
print(f"\ngpu check on {report['device']}")
print("| step | rc | seconds |\n|---|---|---|")
for s in steps:
    print(f"| {s['step']} | {s['rc']} | {s['seconds']} |")
if report.get("sync_count"):
    print("host syncs per step:", report["sync_count"])
PY
