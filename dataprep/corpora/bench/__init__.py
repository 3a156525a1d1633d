"""The benchmark corpus: seven real domains of uneven size (Austen's novels, fortunes, standard-library
code, CHAMP math and dialogue, the Python docs, FOLDOC) and a target set of three subtasks, built from
material that installs from the package registries and works offline, run through dataprep into shards
with its own tokenizer. Not committed: `python launch/bench_corpus.py` builds it, and so does the first
`launch/train.py data=bench` (`build:` in configs/data/bench.yaml). `readers` holds one document
generator per source, `sources` fetches them, `pipeline` splits, trains the tokenizer and runs dataprep."""
from dataprep.corpora.bench.pipeline import build, default_root, ensure  # noqa: F401
