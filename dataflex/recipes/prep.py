"""Prepare a corpus: clean, filter, deduplicate and tokenize into Megatron shards with a lineage manifest.

    python launch/prep.py data=default                     # the embedded corpus -> outputs/prep/default/default
    python launch/prep.py data=default prep=minimal        # another chain -> outputs/prep/default/minimal
    python launch/prep.py --config-dir DIR data=mine       # your DIR/data/mine.yaml
    python launch/prep.py data=default prep.execution.workers=4 prep.output_dir=prepared/x

Then train on it with a data config holding ``manifest: <output_dir>/manifest.json``.
See dataprep/README.md.
"""
from __future__ import annotations

import os
import sys

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from dataflex.utils.paths import configs_dir


def main():
    """launch/prep.py and `dataflex prep`: the command line's config files checked for alias bombs, then Hydra."""
    from dataflex.run.yaml_files import check_yaml_aliases

    check_yaml_aliases(sys.argv[1:], str(configs_dir()), "prep", "prep")
    return hydra_main()


@hydra.main(config_path=str(configs_dir()), config_name="prep", version_base=None)
def hydra_main(cfg: DictConfig) -> None:
    from dataflex.utils.console import quiet_third_party

    quiet_third_party(bool(OmegaConf.select(cfg, "prep.execution.verbose", default=False)))
    from dataprep.config import config_files_from_hydra, locate
    from dataprep.readers import InputError
    from dataprep.run import prepare

    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except Exception as e:      # e.g. a ${key} naming no key: one line, exit 2
        key = getattr(e, "full_key", None)
        print(f"prep: error: {key + ': ' if key else ''}{str(e).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
    before = previous_recipe(resolved["prep"].get("output_dir"))
    try:
        path = prepare(resolved["data"], resolved["prep"])
    except (InputError, ValueError, FileNotFoundError) as e:
        print(f"prep: error: {locate(str(e), config_files_from_hydra())}", file=sys.stderr)
        sys.exit(2)
    print(summary(path, before))


def previous_recipe(output_dir) -> str | None:
    """The recipe hash of the manifest already in output_dir, if any."""
    import json

    path = os.path.join(str(output_dir or ""), "manifest.json")
    try:
        with open(path) as f:
            return json.load(f).get("config_sha256")
    except (OSError, ValueError):
        return None


def summary(manifest_path: str, previous: str | None = None) -> str:
    """One screen: what was read, what each step dropped and why, what each domain kept."""
    from dataprep.manifest import read_manifest

    m = read_manifest(manifest_path)
    t = m["totals"]
    lines = [f"prep: wrote {manifest_path}"]
    if previous and previous != m["config_sha256"]:
        lines.append(f"  (replaced the output of a different recipe in {os.path.dirname(manifest_path)})")
    lines.append(f"  read {t['records_read']:,} records from {len(m['inputs'])} input file(s); kept {t['documents']:,} "
                 f"documents, {t['tokens']:,} tokens in {t['shards']} shard(s); dropped "
                 f"{t['records_read'] - t['documents']:,}")
    lines.append("  dropped by step and reason:")
    for step in m["steps"]:
        n = sum(step["dropped"].values())
        why = ", ".join(f"{k} {v:,}" for k, v in sorted(step["dropped"].items(), key=lambda kv: -kv[1]))
        lines.append(f"    {step['name']:<18}{n:>8,}" + (f"   {why}" if why else ""))
    read: dict = {}
    for inp in m["inputs"]:
        read[inp["domain"]] = read.get(inp["domain"], 0) + inp["records"]
    lines.append(f"  {'domain':<20}{'read':>8}{'kept':>8}{'dropped':>9}{'train docs':>12}{'val docs':>10}{'tokens':>11}")
    empty = []
    for name, d in m["domains"].items():
        splits = d["splits"]
        train_docs, val_docs = splits.get("train", {}).get("documents", 0), splits.get("val", {}).get("documents", 0)
        n = read.get(name, 0)
        lines.append(f"  {name:<20}{n:>8,}{d['documents']:>8,}{n - d['documents']:>9,}{train_docs:>12,}{val_docs:>10,}"
                     f"{d['tokens']:>11,}")
        if train_docs == 0:
            empty.append(name)
    if empty:
        lines.append(f"  no training documents left in {', '.join(empty)}: train on this manifest with "
                     f"`exclude: [{', '.join(empty)}]` in the data config")
    lines.append(f"  train on it: a data config holding `manifest: {manifest_path}`")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
