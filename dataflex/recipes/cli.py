"""`dataflex VERB ARGS...`: the console command. Each verb runs its recipe exactly as `python launch/VERB.py ARGS...`
would (Hydra overrides for `train` and `prep`, flags for the others), from any folder."""
from __future__ import annotations

import importlib
import sys

VERBS = {
    "train": ("dataflex.recipes.train", "train a model with data plugins (Hydra overrides: +mixer=bandit ...)"),
    "prep": ("dataflex.recipes.prep", "raw text -> Megatron shards with a manifest (Hydra overrides: data=NAME ...)"),
    "compare": ("dataflex.recipes.compare", "one results page for a sweep or a folder of runs"),
    "score": ("dataflex.recipes.score", "score a pool offline with LESS features from a run's checkpoints"),
    "where": ("dataflex.recipes.where", "where did a training sample come from"),
    "regmix": ("dataflex.recipes.regmix", "RegMix: proxy runs, a regression, and the mixture it predicts"),
    "corpus": ("dataflex.recipes.corpus", "build the benchmark corpus (seven real domains) into the data cache"),
}


def usage() -> str:
    from dataflex.utils.version import __version__
    lines = [f"usage: dataflex VERB [ARGS...]   (dataflex {__version__})", "", "verbs:"]
    lines += [f"  {verb:<8} {help}" for verb, (_, help) in VERBS.items()]
    lines += ["", "`dataflex VERB --help` shows a verb's own options."]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from dataflex.utils.version import __version__
        print(__version__)
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"dataflex: error: unknown verb {verb!r}\n\n{usage()}", file=sys.stderr)
        return 2
    sys.argv = [f"dataflex {verb}", *rest]     # what the recipe parses (Hydra and argparse read sys.argv)
    module = importlib.import_module(VERBS[verb][0])
    result = module.main()
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
