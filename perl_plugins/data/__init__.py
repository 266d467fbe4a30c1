"""Shipped data (Taskmaster coffee, CC BY 4.0: see ATTRIBUTION.md) and its loader."""

from perl_plugins.data.taskmaster import (
    DEFAULT_DIALOGS_FILE,
    DEFAULT_REWARD_FILE,
    DatasetFormatError,
    FeedbackRow,
    count_leaks,
    fold_rows,
    load_dialog_texts,
    load_feedback,
    load_splits,
    pointwise,
    preference_pairs,
    render_turn,
    split_ids,
    split_rows,
)

__all__ = [
    "DEFAULT_DIALOGS_FILE",
    "DEFAULT_REWARD_FILE",
    "DatasetFormatError",
    "FeedbackRow",
    "count_leaks",
    "fold_rows",
    "load_dialog_texts",
    "load_feedback",
    "load_splits",
    "pointwise",
    "preference_pairs",
    "render_turn",
    "split_ids",
    "split_rows",
]
