"""Train a causal LM with data that takes part in training.

The recipe is dataflex/recipes/train.py (also `dataflex train ...` once installed); this script runs it from a clone."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dataflex.recipes.train import main  # noqa: E402

if __name__ == "__main__":
    result = main()
    sys.exit(result if isinstance(result, int) else 0)
