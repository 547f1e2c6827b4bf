"""Evaluation: perplexity, few-shot episode accuracy, fine-tuned tagging and k-shot classification, a downstream
task, LEOPARD files, FLOP formulas, the suite.

The compute of a whole run (``run_flops``, ``steps_for_flops``) is in
[`picomaml.train.budget`][picomaml.train.budget], and loading a run (or an exported model) for evaluation,
[`load_for_eval`][picomaml.train.loading.load_for_eval], in
[`picomaml.train.loading`][picomaml.train.loading]: both read the training layer's config.
"""

from picomaml.eval.downstream import documents_dataset, downstream_eval, load_downstream_dataset
from picomaml.eval.during_training import EvalConfig, check_eval_episodes, evaluate_during_training
from picomaml.eval.fewshot import (
    FewShotResult,
    fewshot_eval,
    format_fewshot_table,
    head_for_n_way,
    nearest_class_mean,
)
from picomaml.eval.finetune import (
    FINETUNE_MODES,
    ClassificationResult,
    FinetuneSummary,
    TaggingResult,
    finetune_classifier,
    finetune_eval,
    finetune_tagger,
)
from picomaml.eval.flops import ar_step_flops, meta_step_flops
from picomaml.eval.leopard import FewShotDataset, LeopardFormatError, load_leopard_file, to_episodes
from picomaml.eval.perplexity import perplexity, token_nll
from picomaml.eval.probe import fit_linear_probe, linear_probe_accuracy, linear_probe_predict
from picomaml.eval.stats import binomial_ci, holm, mean_ci, normal_quantile, t_quantile, t_test_p
from picomaml.eval.suite import format_suite_table, run_suite
from picomaml.eval.tagging import (
    IGNORE_INDEX,
    AlignedSentence,
    EntityScores,
    align_subwords,
    entity_chunks,
    entity_scores,
    is_bio,
    macro_f1,
    token_accuracy,
)

__all__ = [
    "perplexity",
    "evaluate_during_training",
    "EvalConfig",
    "check_eval_episodes",
    "token_nll",
    "FewShotResult",
    "fewshot_eval",
    "format_fewshot_table",
    "head_for_n_way",
    "nearest_class_mean",
    "fit_linear_probe",
    "linear_probe_predict",
    "linear_probe_accuracy",
    "mean_ci",
    "binomial_ci",
    "t_quantile",
    "normal_quantile",
    "t_test_p",
    "holm",
    "downstream_eval",
    "load_downstream_dataset",
    "documents_dataset",
    "ar_step_flops",
    "meta_step_flops",
    "FewShotDataset",
    "LeopardFormatError",
    "load_leopard_file",
    "to_episodes",
    "run_suite",
    "format_suite_table",
    "FINETUNE_MODES",
    "finetune_tagger",
    "finetune_classifier",
    "finetune_eval",
    "TaggingResult",
    "ClassificationResult",
    "FinetuneSummary",
    "IGNORE_INDEX",
    "AlignedSentence",
    "EntityScores",
    "align_subwords",
    "entity_chunks",
    "entity_scores",
    "is_bio",
    "macro_f1",
    "token_accuracy",
]
