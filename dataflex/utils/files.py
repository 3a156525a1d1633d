"""File helpers shared by every layer (dataprep's, re-exported): an exclusive lock across processes."""
from dataprep.writer import file_lock, sha256_file  # noqa: F401
