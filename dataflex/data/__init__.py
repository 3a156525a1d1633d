"""One data package from config to dataset, as Megatron-core's `datasets`: a data config read and checked
(`config`), documents as samples (`samples`), Megatron shards read memory-mapped (`shards`), the cache that
tokenizes raw files once (`cache`), the domains of a run (`domains.load_domains`), the training mixture
(`mixture`) and where a sample came from (`provenance`). Imports `utils` and `dataprep`."""
from dataflex.data.domains import Domains, load_domains
from dataflex.data.mixture import DomainIndex, MixtureDataset
from dataflex.data.samples import SampleSet
from dataflex.utils.errors import DataConfigError

__all__ = ["DataConfigError", "DomainIndex", "Domains", "MixtureDataset", "SampleSet", "load_domains"]
