"""Which exceptions are the user's to fix (a flag, a file, a checkpoint directory): the CLI reports
each as one ``perl-plugins: error: ...`` line with exit status 2, never as a traceback."""

from __future__ import annotations


def user_error_types() -> tuple[type[BaseException], ...]:
    """The exception classes the CLI reports as user errors. Imported on demand: only a failing
    command pays for the imports."""
    import yaml

    from perl_plugins.checkpoint.export import ExportError
    from perl_plugins.checkpoint.store import CheckpointError
    from perl_plugins.data.split_checks import SplitTooSmallError
    from perl_plugins.data.taskmaster import DatasetFormatError
    from perl_plugins.errors import PluginError, UsageError
    from perl_plugins.models.reward import RewardAdapterError

    return (
        PluginError,
        UsageError,
        CheckpointError,
        ExportError,
        DatasetFormatError,
        SplitTooSmallError,
        RewardAdapterError,
        FileNotFoundError,
        NotADirectoryError,
        yaml.YAMLError,
    )


def is_user_error(exc: BaseException) -> bool:
    return isinstance(exc, user_error_types())
