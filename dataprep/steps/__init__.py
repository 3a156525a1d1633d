"""Operators: small composable generator steps (``run(docs) -> docs``), each keeping its own stats.

Each step lives in its own module; configure them in ``configs/prep/*.yaml`` with ``_target_``.
"""
from dataprep.steps.base import DedupStep, FilterStep, Step  # noqa: F401
