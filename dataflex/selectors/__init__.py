"""Selectors output a keep mask over candidate samples."""
from ..registry import Registry
from .cluster_less import ClusterLessSelector, cluster_scores, kmeans, representatives
from .delta_loss import DeltaLossSelector, delta_scores
from .gradnorm import GradNormSelector, el2n
from .less import LessSelector, adam_feature, less_scores
from .loss import LossSelector, select_top_loss
from .near import NearSelector, near_scores
from .random import RandomSelector, select_random
from .rho import RhoLossSelector, rho_scores
from .tracin import TracInSelector, tracin_scores
from .tsds import TsdsSelector, tsds_probabilities, tsds_sample

SELECTORS = Registry("selector", {"loss": LossSelector, "random": RandomSelector, "rho": RhoLossSelector,
                                  "delta_loss": DeltaLossSelector, "gradnorm": GradNormSelector,
                                  "tracin": TracInSelector, "less": LessSelector, "near": NearSelector,
                                  "tsds": TsdsSelector, "cluster_less": ClusterLessSelector})

__all__ = ["SELECTORS", "DeltaLossSelector", "GradNormSelector", "LossSelector", "RandomSelector", "RhoLossSelector",
           "TracInSelector", "tracin_scores", "LessSelector", "adam_feature", "less_scores",
           "delta_scores", "el2n", "rho_scores", "select_random", "select_top_loss",
           "NearSelector", "near_scores", "TsdsSelector", "tsds_probabilities", "tsds_sample",
           "ClusterLessSelector", "kmeans", "representatives", "cluster_scores"]
