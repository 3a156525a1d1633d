"""Build the benchmark corpus (a no-op when it is built already; prints where it is).

The recipe is dataflex/recipes/corpus.py (also `dataflex corpus ...` once installed); this script runs it from a clone."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dataflex.recipes.corpus import main  # noqa: E402

if __name__ == "__main__":
    result = main()
    sys.exit(result if isinstance(result, int) else 0)
