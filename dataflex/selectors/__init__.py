"""Selectors output a keep mask over candidate samples."""
from dataflex.core.loss import el2n
from dataflex.core.registry import Registry
from dataflex.selectors.bm25 import BM25Selector, bm25_scores
from dataflex.selectors.cluster_less import ClusterLessSelector, cluster_scores, kmeans, representatives
from dataflex.selectors.delta_loss import DeltaLossSelector, delta_scores
from dataflex.selectors.gradnorm import GradNormSelector
from dataflex.selectors.length_matched import LengthMatchedSelector, length_matched
from dataflex.selectors.less.math import adam_feature, less_scores
from dataflex.selectors.less.plugin import LessSelector
from dataflex.selectors.loss import LossSelector, select_top_loss
from dataflex.selectors.near import NearSelector, near_scores
from dataflex.selectors.random import RandomSelector, select_random
from dataflex.selectors.rho import RhoLossSelector, rho_scores
from dataflex.selectors.tracin import TracInSelector, tracin_scores
from dataflex.selectors.tsds import TsdsSelector, tsds_probabilities, tsds_sample

SELECTORS = Registry("selector", {"loss": LossSelector, "random": RandomSelector, "rho": RhoLossSelector,
                                  "delta_loss": DeltaLossSelector, "gradnorm": GradNormSelector,
                                  "tracin": TracInSelector, "less": LessSelector, "near": NearSelector,
                                  "tsds": TsdsSelector, "cluster_less": ClusterLessSelector,
                                  "length_matched": LengthMatchedSelector, "bm25": BM25Selector})

__all__ = ["SELECTORS", "DeltaLossSelector", "GradNormSelector", "LossSelector", "RandomSelector", "RhoLossSelector",
           "TracInSelector", "tracin_scores", "LessSelector", "adam_feature", "less_scores",
           "delta_scores", "el2n", "rho_scores", "select_random", "select_top_loss",
           "NearSelector", "near_scores", "TsdsSelector", "tsds_probabilities", "tsds_sample",
           "ClusterLessSelector", "kmeans", "representatives", "cluster_scores",
           "LengthMatchedSelector", "length_matched", "BM25Selector", "bm25_scores"]
