"""Prepare a corpus: clean, filter, deduplicate and tokenize into Megatron shards with a lineage manifest.

The recipe is dataflex/recipes/prep.py (also `dataflex prep ...` once installed); this script runs it from a clone."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dataflex.recipes.prep import main  # noqa: E402

if __name__ == "__main__":
    result = main()
    sys.exit(result if isinstance(result, int) else 0)
