"""Quiet by default: a progress bar (with the latest loss on it) instead of one dict per logging
step on stdout. ``--log_level info`` (or debug) keeps trl's per-step dicts; every logged value
still reaches ``trainer_state.json`` and each ``report_to`` backend."""

from __future__ import annotations

from typing import Any

from transformers import PrinterCallback, ProgressCallback

VERBOSE_LEVELS = ("debug", "info")


class QuietProgressCallback(ProgressCallback):
    """The stock progress bar; a log shows as the bar's postfix (loss, reward) instead of a printed dict."""

    SHOWN = ("loss", "reward", "kl", "grm_reg_loss", "reward_loss")

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if state.is_world_process_zero and self.training_bar is not None and logs:
            shown = {k: f"{v:.4g}" for k, v in logs.items() if k in self.SHOWN and isinstance(v, (int, float))}
            if shown:
                self.training_bar.set_postfix(shown, refresh=False)


def is_verbose(args: Any) -> bool:
    return str(getattr(args, "log_level", "passive")).lower() in VERBOSE_LEVELS


def quiet_progress(trainer: Any) -> Any:
    """Swap the trainer's per-step printing for :class:`QuietProgressCallback` unless its
    ``log_level`` is info or debug; returns the trainer."""
    if is_verbose(trainer.args):
        return trainer
    handler = trainer.callback_handler
    printers = [cb for cb in handler.callbacks if type(cb) in (ProgressCallback, PrinterCallback)]
    for callback in printers:
        handler.remove_callback(callback)
    if printers and not trainer.args.disable_tqdm:
        handler.add_callback(QuietProgressCallback())
    return trainer
