"""Where did training sample SAMPLE_ID of RUN_DIR come from?

    python launch/where.py RUN_DIR SAMPLE_ID [--manifest PATH] [--json]

Resolves the id through RUN_DIR/data.json (the run's shards and sample index: the data cache of a
raw-file run, or the dataprep manifest) and prints the source file and line, domain, split, shard and
index in the shard. Runs without data.json: joins RUN_DIR/samples.parquet with the manifest's provenance
(found from RUN_DIR/config.yaml key data.manifest unless --manifest is given).
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("sample_id", type=int)
    ap.add_argument("--manifest", default=None, help="manifest.json (default: data.manifest of RUN_DIR/config.yaml)")
    ap.add_argument("--json", action="store_true", help="print JSON")
    args = ap.parse_args(argv)
    from dataflex.utils.console import quiet_third_party

    quiet_third_party(False)   # megatron's import warnings (Transformer Engine, Apex) are no answer
    from dataflex.data.provenance import where

    try:
        if raw_run(args.run_dir, args.manifest):
            info = where_raw(args.run_dir, args.sample_id)
        else:
            info = where(args.run_dir, args.sample_id, args.manifest)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"where: error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        unit = "line" if "line" in info else "row"
        print(f"sample {info['sample_id']} (chunk {info['chunk']}) <- {info['source']}:{info[unit]} ({unit})")
        for k in ("doc_id", "domain", "split", "shard", "index_in_shard", "tokens", "manifest", "cache", "text"):
            if k in info:
                print(f"  {k}: {info[k]}")
    return 0


def raw_run(run_dir: str, manifest: str | None) -> bool:
    """A run on raw files (no dataprep manifest) without data.json: samples.parquet alone answers."""
    if manifest or os.path.isfile(os.path.join(run_dir, "data.json")):
        return False
    cfg = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(cfg):
        return os.path.isfile(os.path.join(run_dir, "samples.parquet"))
    from omegaconf import OmegaConf

    return not OmegaConf.select(OmegaConf.load(cfg), "data.manifest", default=None)


def where_raw(run_dir: str, sample_id: int) -> dict:
    """samples.parquet's doc_id is `file:line` (`file:row` for Parquet): the source, with the line's text."""
    from dataflex.data.provenance import sample_row

    row = sample_row(run_dir, sample_id)
    source, _, line = str(row["doc_id"]).rpartition(":")
    unit = "row" if source.endswith(".parquet") else "line"
    info = {"sample_id": sample_id, "chunk": row.get("chunk"), "doc_id": row["doc_id"], "domain": row.get("domain"),
            "split": row.get("split", "train"), "source": source, unit: int(line)}
    if unit == "line" and os.path.isfile(source) and not source.endswith((".gz", ".zst", ".zstd")):
        with open(source, encoding="utf-8", errors="replace") as f:
            for i, text in enumerate(f, start=1):
                if i == int(line):
                    info["text"] = text.rstrip("\n")[:200]
                    break
    return info


if __name__ == "__main__":
    sys.exit(main())
