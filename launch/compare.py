"""Compare finished runs: one results page for a sweep or a folder of runs.

The recipe is dataflex/recipes/compare.py (also `dataflex compare ...` once installed); this script runs it from a clone."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dataflex.recipes.compare import main  # noqa: E402

if __name__ == "__main__":
    result = main()
    sys.exit(result if isinstance(result, int) else 0)
