"""Where did training sample SAMPLE_ID of RUN_DIR come from?

The recipe is dataflex/recipes/where.py (also `dataflex where ...` once installed); this script runs it from a clone."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dataflex.recipes.where import main  # noqa: E402

if __name__ == "__main__":
    result = main()
    sys.exit(result if isinstance(result, int) else 0)
