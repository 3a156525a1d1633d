"""`python -m dataflex VERB ...`, the same as the `dataflex` command."""
import sys

from dataflex.recipes.cli import main

sys.exit(main())
