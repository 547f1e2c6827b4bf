"""Evaluation used during training: held-out perplexity, few-shot episode accuracy, confidence intervals."""

from picomaml.eval.fewshot import (
    FewShotResult,
    fewshot_eval,
    format_fewshot_table,
    head_for_n_way,
    nearest_class_mean,
)
from picomaml.eval.perplexity import perplexity, token_nll
from picomaml.eval.stats import binomial_ci, mean_ci, normal_quantile, t_quantile

__all__ = [
    "perplexity",
    "token_nll",
    "FewShotResult",
    "fewshot_eval",
    "format_fewshot_table",
    "head_for_n_way",
    "nearest_class_mean",
    "mean_ci",
    "binomial_ci",
    "t_quantile",
    "normal_quantile",
]
