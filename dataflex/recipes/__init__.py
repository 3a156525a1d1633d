"""The recipes: what `dataflex VERB` and `launch/VERB.py` run, each a short script read top to bottom
(torchtune's recipes; torchtitan's train.py). `train` trains a model with the plugins, `prep` turns raw text
into Megatron shards, `compare` writes the results page of a sweep, `score` scores a pool offline (LESS),
`where` says where a sample came from, `regmix` fits RegMix's mixture, `corpus` builds the benchmark corpus.
Recipes sit above every other package and are imported only by the command line."""
