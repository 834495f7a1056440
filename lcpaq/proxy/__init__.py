"""Low-cost proxy: a small class-balanced subset, cheap PTQ scores (SEAM margin, KL, accuracy) and
a hyperparameter search over the search's own knobs scored by them.

>>> # sub = proxy_subset(get_dataset("mnist5k", "train"), fraction=0.04)
>>> # ev = ProxyEvaluator(get_model("mnist_resnet"), *sub.tensors())
>>> # ev.evaluate(policy).margin
"""

from lcpaq.proxy.data import ProxySubset, proxy_subset
from lcpaq.proxy.evaluate import PROXY_METRICS, ProxyEvaluator, ProxyScore, margin_score
from lcpaq.proxy.tune import (
            DEFAULT_SPACE,
            Knobs,
            PolicyMaker,
            Trial,
            TuneResult,
            candidate_configs,
            full_score,
            proxy_scores,
            tune,
)

__all__ = ["PROXY_METRICS", "ProxyEvaluator", "ProxyScore", "ProxySubset", "margin_score", "proxy_subset"]
__all__ += ["DEFAULT_SPACE", "Knobs", "PolicyMaker", "Trial", "TuneResult", "candidate_configs", "full_score",
            "proxy_scores", "tune"]
