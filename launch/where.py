"""Where did training sample SAMPLE_ID of RUN_DIR come from?

    python launch/where.py RUN_DIR SAMPLE_ID [--manifest PATH] [--json]

Joins RUN_DIR/samples.parquet with the provenance table of the dataprep manifest (found from
RUN_DIR/config.yaml key data.manifest unless --manifest is given) and prints the source file and line,
domain, split, shard and index in the shard.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("sample_id", type=int)
    ap.add_argument("--manifest", default=None, help="manifest.json (default: data.manifest of RUN_DIR/config.yaml)")
    ap.add_argument("--json", action="store_true", help="print JSON")
    args = ap.parse_args(argv)
    from dataprep.where import where

    try:
        info = where(args.run_dir, args.sample_id, args.manifest)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"where: error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        unit = "line" if "line" in info else "row"
        print(f"sample {info['sample_id']} (chunk {info['chunk']}) <- {info['source']}:{info[unit]} ({unit})")
        for k in ("doc_id", "domain", "split", "shard", "index_in_shard", "tokens", "manifest"):
            print(f"  {k}: {info[k]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
