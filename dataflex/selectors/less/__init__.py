"""LESS, gradient-based targeted data selection (Xia, Malladi, Gururangan, Arora, Chen; ICML 2024), in
three parts:

    plugin.py    LessSelector: the events and the schedule (warm-up pool, checkpoints, selection,
                 online re-scoring), exports and state_dict
    features.py  the features through state.signals (target SGD, pool Adam, projected, normalised),
                 their cosines per target subtask, the per-checkpoint store on disk and selection files
    math.py      the arithmetic: adam_feature, cosines per subtask, aggregate, less_scores, top_fraction,
                 make_projector

The names below are the package's public ones (`dataflex.selectors.less.math`, the old home of math.py,
still imports for one release with a DeprecationWarning).
"""
from dataflex.selectors.less.features import FeatureStore, LessFeatures, load_selection, save_scores
from dataflex.selectors.less.math import (
    FEATURES,
    PROJECTORS,
    adam_feature,
    aggregate,
    checkpoint_weights,
    l2_normalize,
    less_scores,
    make_projector,
    subtask_cosines,
    subtask_matrix,
    top_fraction,
)
from dataflex.selectors.less.plugin import LessSelector

__all__ = ["LessSelector", "LessFeatures", "FeatureStore", "load_selection", "save_scores", "FEATURES",
           "PROJECTORS", "adam_feature", "aggregate", "checkpoint_weights", "l2_normalize", "less_scores",
           "make_projector", "subtask_cosines", "subtask_matrix", "top_fraction"]
