"""dataprep feeding training: shards -> `data` -> `deepspeed launch/train.py`, and a ledger sample
traced back through the provenance table to the very line of its source file."""
import json
import sys
from pathlib import Path

import pandas as pd
import torch
from test_launch import ROOT, check_outputs, deepspeed, run

from dataflex.data.domains import load_domains
from dataprep.tokenizer import load_tokenizer

FAST = ["trainer.max_steps=4", "trainer.eval_every=2", "trainer.global_batch_size=8", "trainer.max_val_samples=8",
        "model.d_model=32", "model.seq_len=64"]


def test_shards_feed_deepspeed_training_and_trace_back(tmp_path):
    conf = tmp_path / "conf" / "data"
    conf.mkdir(parents=True)
    domains = ("prose", "code", "math", "noise")
    (conf / "raw.yaml").write_text("domains:\n" + "".join(
        f"  {d}: {{train: {ROOT}/data/default/{d}/train.jsonl, val: {ROOT}/data/default/{d}/val.jsonl}}\n"
        for d in domains) + f"tokenizer: {ROOT}/data/default/tokenizer.json\n")
    prepared = tmp_path / "prepared"
    run([sys.executable, "launch/prep.py", "--config-dir", str(tmp_path / "conf"), "data=raw", "prep=minimal",
         f"prep.output_dir={prepared}", "prep.execution.progress=false"])
    (conf / "prepped.yaml").write_text(f"manifest: {prepared / 'manifest.json'}\n")

    run_dir = tmp_path / "run"
    run(deepspeed("launch/train.py", "--config-dir", str(tmp_path / "conf"), "data=prepped", "+mixer=bandit",
                  "logger=none", *FAST, f"hydra.run.dir={run_dir}"))
    ledger, _ = check_outputs(run_dir, 4, 8, {0}, wandb=False)

    samples = pd.read_parquet(run_dir / "samples.parquet")
    first_chunks = samples[samples.chunk == 0].sample_id
    sample_id = int(ledger[ledger.sample_id.isin(first_chunks)].sample_id.iloc[0])
    info = json.loads(run([sys.executable, "launch/where.py", str(run_dir), str(sample_id), "--json"]).stdout)
    source_line = Path(info["source"]).read_text().splitlines()[info["line"] - 1]
    text = json.loads(source_line)["text"]
    tokenizer = load_tokenizer(ROOT / "data" / "default" / "tokenizer.json")
    # the sample the run trained on starts with the tokens of that source line
    trained = load_domains({"manifest": str(prepared / "manifest.json")}, seq_len=64)
    names = list(trained.train)
    offset = sum(len(trained.train[n]) for n in names[:names.index(info["domain"])])
    row = trained.train[info["domain"]].input_ids[sample_id - offset]
    expected = torch.tensor(tokenizer.encode(text)[:64])
    assert torch.equal(row[:len(expected)], expected)
