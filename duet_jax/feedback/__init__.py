"""The unseen task's feedback: sources (external command, Python callable; the built-in task
evaluator lives with the trainer) and lm-evaluation-harness style metrics."""

from duet_jax.feedback.metrics import (
                                       choice_byte_lengths,
                                       exact_match,
                                       extract_number,
                                       mc_accuracy,
                                       normalize_answer,
)
from duet_jax.feedback.sources import (
                                       CallableFeedback,
                                       CommandFeedback,
                                       FeedbackRequest,
                                       FeedbackSource,
                                       check_feedback_config,
                                       parse_feedback,
)

__all__ = [
    "CallableFeedback", "CommandFeedback", "FeedbackRequest", "FeedbackSource", "check_feedback_config",
    "choice_byte_lengths",
    "exact_match", "extract_number", "mc_accuracy", "normalize_answer", "parse_feedback",
]
