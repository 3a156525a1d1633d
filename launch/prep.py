"""Prepare a corpus: clean, filter, deduplicate and tokenize into Megatron shards with a lineage manifest.

    python launch/prep.py data=default                     # the embedded corpus
    python launch/prep.py --config-dir DIR data=mine       # your DIR/data/mine.yaml
    python launch/prep.py data=default prep.execution.workers=4 prep.output_dir=prepared/x

Then train on it with a data config holding ``manifest: <output_dir>/manifest.json``.
See dataprep/README.md.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402


@hydra.main(config_path="../configs", config_name="prep", version_base=None)
def main(cfg: DictConfig) -> None:
    from dataprep.config import config_files_from_hydra, locate
    from dataprep.readers import InputError
    from dataprep.run import prepare

    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except Exception as e:
        sys.exit(f"prep: bad config: {e}")
    try:
        path = prepare(resolved["data"], resolved["prep"])
    except (InputError, ValueError, FileNotFoundError) as e:
        sys.exit(f"prep: error: {locate(str(e), config_files_from_hydra())}")
    print(f"prep: wrote {path}")


if __name__ == "__main__":
    main()
