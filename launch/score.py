"""LESS scoring offline: a pool scored against a target from a finished run's checkpoints.

The recipe is dataflex/recipes/score.py (also `dataflex score ...` once installed); this script runs it from a clone."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dataflex.recipes.score import main  # noqa: E402

if __name__ == "__main__":
    result = main()
    sys.exit(result if isinstance(result, int) else 0)
