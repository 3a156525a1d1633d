"""dataprep: turn raw text corpora into Megatron indexed shards with a lineage manifest.

Entry points:
  * ``python launch/prep.py data=NAME``        run the configured chain (see ``dataprep/README.md``)
  * ``dataprep.manifest.load_prepared(path)``  read prepared shards back for training
  * ``python launch/where.py RUN_DIR SAMPLE``  trace a training sample back to its source line
"""
__version__ = "0.1.0"
