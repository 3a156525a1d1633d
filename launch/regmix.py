"""RegMix (Liu et al., ICLR 2025) end to end: sample mixtures, run the short proxy runs as one Hydra

The recipe is dataflex/recipes/regmix.py (also `dataflex regmix ...` once installed); this script runs it from a clone."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dataflex.recipes.regmix import main  # noqa: E402

if __name__ == "__main__":
    result = main()
    sys.exit(result if isinstance(result, int) else 0)
