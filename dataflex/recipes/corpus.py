"""Build the benchmark corpus (a no-op when it is built already; prints where it is).

    python launch/bench_corpus.py                    # into ${DATAFLEX_CACHE:-~/.cache/dataflex}/bench_corpus
    python launch/bench_corpus.py --out DIR          # elsewhere; train with data=bench data.build.root=DIR
    python launch/bench_corpus.py --skip-missing     # build from the sources that can be had here

Debian packages (r-cran-janeaustenr, fortunes, fortunes-min, dict-foldoc, python3.X-doc) are fetched
with `apt-get download` into the cache and unpacked there (nothing is installed); `champ-dataset` and
`rdata` come from pip. See dataflex/corpus/ and the README's "Benchmark corpus".
"""
import argparse
import sys


def main() -> None:
    from dataflex.utils.console import quiet_third_party
    from dataprep.corpora.bench import build, default_root
    from dataprep.corpora.bench.sources import MissingSource

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help=f"corpus folder (default {default_root()})")
    ap.add_argument("--skip-missing", action="store_true", help="leave out the domains whose source is missing")
    ap.add_argument("--workers", type=int, default=None, help="dataprep processes (default min(2, CPUs))")
    args = ap.parse_args()
    quiet_third_party(False)
    try:
        build(args.out, skip_missing=args.skip_missing, workers=args.workers)
    except MissingSource as e:
        sys.exit(str(e))


if __name__ == "__main__":
    main()
