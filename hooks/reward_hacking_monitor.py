"""reward_hacking_monitor: warn (and optionally stop) when a GRPO/RLOO run looks like reward hacking.

Load it with ``--plugins ./hooks/reward_hacking_monitor.py`` or
``perl_plugins.attach(trainer, plugins="./hooks/reward_hacking_monitor.py", reward_hacking_monitor_stop=True)``.

It reads the metrics trl logs (``kl``, only logged when ``beta != 0``; ``entropy``; ``reward``) and
raises a :class:`RewardHackingWarning` when

- ``kl_threshold``: KL to the reference exceeds ``reward_hacking_monitor_kl_max``;
- ``kl_acceleration``: the KL slope over the last ``window`` logs exceeds both
  ``reward_hacking_monitor_kl_min_slope`` and ``kl_slope_factor`` times the slope of the window before;
- ``reward_hacking``: KL accelerates while the reward rises over the same window (the classic
  pattern: the policy buys reward by drifting away from the reference);
- ``entropy_collapse``: entropy falls below ``entropy_fraction`` of its initial value (the mean of
  the first ``window`` logs).

A warning is raised when a condition starts to hold, not on every log while it holds. Every
training log also gets ``monitor/alerts`` (how many conditions hold) and ``monitor/<kind>`` (1.0
while that condition holds). With ``reward_hacking_monitor_stop`` a new alert stops training.
Slopes are per logged point (least squares), so they depend on ``logging_steps``.
"""

import dataclasses
import math
import warnings
from collections.abc import Mapping
from typing import Any

import perl_plugins
from perl_plugins import trainer_family
from perl_plugins.errors import PluginIncompatibleError

RL_FAMILIES = ("GRPOTrainer", "RLOOTrainer")
ALERT_KINDS = ("kl_threshold", "kl_acceleration", "reward_hacking", "entropy_collapse")


class RewardHackingWarning(UserWarning):
    """Emitted for each new alert; filter or escalate it with the ``warnings`` module."""


@dataclasses.dataclass
class RewardHackingMonitorOptions:
    reward_hacking_monitor_kl_max: float = dataclasses.field(
        default=1.0, metadata={"help": "Alert when the logged KL to the reference exceeds this (0 disables)."}
    )
    reward_hacking_monitor_window: int = dataclasses.field(
        default=5, metadata={"help": "Logged points per window for slopes and for the initial entropy."}
    )
    reward_hacking_monitor_kl_slope_factor: float = dataclasses.field(
        default=3.0,
        metadata={"help": "Alert when the KL slope of the last window exceeds this factor times the previous one."},
    )
    reward_hacking_monitor_kl_min_slope: float = dataclasses.field(
        default=0.005,
        metadata={"help": "KL slope (per logged point) below which KL growth is never called acceleration."},
    )
    reward_hacking_monitor_entropy_fraction: float = dataclasses.field(
        default=0.25,
        metadata={"help": "Alert when entropy drops below this fraction of its initial value (0 disables)."},
    )
    reward_hacking_monitor_stop: bool = dataclasses.field(
        default=False, metadata={"help": "Stop training (control.should_training_stop) on a new alert."}
    )

    def __post_init__(self) -> None:
        if self.reward_hacking_monitor_window < 2:
            raise ValueError(f"reward_hacking_monitor_window must be >= 2, got {self.reward_hacking_monitor_window}")
        if self.reward_hacking_monitor_kl_slope_factor < 1:
            raise ValueError("reward_hacking_monitor_kl_slope_factor must be >= 1")
        if not 0 <= self.reward_hacking_monitor_entropy_fraction < 1:
            raise ValueError("reward_hacking_monitor_entropy_fraction must be in [0, 1)")
        if self.reward_hacking_monitor_kl_max < 0 or self.reward_hacking_monitor_kl_min_slope < 0:
            raise ValueError("reward_hacking_monitor_kl_max and _kl_min_slope must be >= 0")


@dataclasses.dataclass(frozen=True)
class Alert:
    kind: str  # one of ALERT_KINDS
    step: int | None
    message: str


def slope(values: list[float]) -> float:
    """Least-squares slope of ``values`` against their index."""
    n = len(values)
    x_mean, y_mean = (n - 1) / 2, sum(values) / n
    num = sum((i - x_mean) * (y - y_mean) for i, y in enumerate(values))
    return num / sum((i - x_mean) ** 2 for i in range(n))


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


class RewardHackingDetector:
    """The monitor's logic, free of trainers: feed it log dicts, get the alerts that newly fire."""

    WATCHED = ("kl", "entropy", "reward")

    def __init__(
        self,
        kl_max: float = 1.0,
        window: int = 5,
        kl_slope_factor: float = 3.0,
        kl_min_slope: float = 0.005,
        entropy_fraction: float = 0.25,
    ) -> None:
        self.kl_max = kl_max
        self.window = window
        self.kl_slope_factor = kl_slope_factor
        self.kl_min_slope = kl_min_slope
        self.entropy_fraction = entropy_fraction
        self.history: list[dict[str, float | None]] = []  # one entry per training log seen
        self.firing: set[str] = set()

    @classmethod
    def from_options(cls, opts: RewardHackingMonitorOptions) -> "RewardHackingDetector":
        return cls(
            kl_max=opts.reward_hacking_monitor_kl_max,
            window=opts.reward_hacking_monitor_window,
            kl_slope_factor=opts.reward_hacking_monitor_kl_slope_factor,
            kl_min_slope=opts.reward_hacking_monitor_kl_min_slope,
            entropy_fraction=opts.reward_hacking_monitor_entropy_fraction,
        )

    def _series(self, key: str) -> list[float]:
        return [h[key] for h in self.history if h[key] is not None]

    def update(self, logs: Mapping[str, Any], step: int | None = None) -> list[Alert]:
        """Record one log; return the alerts whose condition holds now but did not at the last log.

        Logs without any watched key (eval logs are ``eval_``-prefixed, the final summary has
        none) are ignored and leave the firing conditions as they were.
        """
        point = {key: _number(logs.get(key)) for key in self.WATCHED}
        if all(value is None for value in point.values()):
            return []
        self.history.append(point)
        conditions = self._conditions()
        new = [Alert(kind, step, message) for kind, message in conditions.items() if kind not in self.firing]
        self.firing = set(conditions)
        return new

    def _conditions(self) -> dict[str, str]:
        """Every alert condition that holds after the latest log, with its message."""
        found = {}
        kl, entropy, reward = self._series("kl"), self._series("entropy"), self._series("reward")
        latest = self.history[-1]
        if self.kl_max > 0 and latest["kl"] is not None and latest["kl"] > self.kl_max:
            found["kl_threshold"] = f"KL to the reference is {latest['kl']:.4g} > {self.kl_max:g}."
        w = self.window
        if latest["kl"] is not None and len(kl) >= 2 * w:
            recent, before = slope(kl[-w:]), slope(kl[-2 * w : -w])
            if recent > self.kl_min_slope and recent > self.kl_slope_factor * max(before, 0.0):
                found["kl_acceleration"] = (
                    f"KL is accelerating: slope {recent:.4g}/log over the last {w} logs vs {before:.4g} before."
                )
                if len(reward) >= w and latest["reward"] is not None and slope(reward[-w:]) > 0:
                    found["reward_hacking"] = (
                        f"Reward rises (slope {slope(reward[-w:]):.4g}/log) while KL accelerates: "
                        "the policy may be exploiting the reward."
                    )
        if self.entropy_fraction > 0 and latest["entropy"] is not None and len(entropy) > w:
            initial = sum(entropy[:w]) / w
            if latest["entropy"] < self.entropy_fraction * initial:
                found["entropy_collapse"] = (
                    f"Policy entropy collapsed to {latest['entropy']:.4g}, below "
                    f"{self.entropy_fraction:g} x its initial {initial:.4g}."
                )
        return found


@perl_plugins.hookimpl
def perl_plugin_options() -> type:
    return RewardHackingMonitorOptions


@perl_plugins.hookimpl
def perl_check_trainer(trainer: Any) -> None:
    family = trainer_family(trainer)
    if family not in RL_FAMILIES:
        raise PluginIncompatibleError(
            f"Plugin 'reward_hacking_monitor' reads GRPO/RLOO metrics (kl, entropy, reward), got {family}."
        )


@perl_plugins.hookimpl
def perl_configure(trainer: Any, options: dict[str, Any]) -> None:
    # Per-trainer state: the plugin module is shared by every trainer it is attached to.
    trainer.reward_hacking_monitor = RewardHackingDetector.from_options(options["reward_hacking_monitor"])
    if getattr(trainer, "beta", 0.0) == 0.0:
        warnings.warn(
            "reward_hacking_monitor: beta == 0, so trl logs no KL; only entropy is watched.",
            RewardHackingWarning,
            stacklevel=2,
        )


@perl_plugins.hookimpl
def perl_on_log(trainer: Any, logs: dict[str, float], state: Any, control: Any, options: dict[str, Any]) -> None:
    detector: RewardHackingDetector = trainer.reward_hacking_monitor
    seen = len(detector.history)
    alerts = detector.update(logs, step=state.global_step)
    if len(detector.history) == seen:  # not a training-metrics log
        return
    logs["monitor/alerts"] = float(len(detector.firing))
    for kind in ALERT_KINDS:
        logs[f"monitor/{kind}"] = float(kind in detector.firing)
    stop = bool(alerts) and options["reward_hacking_monitor"].reward_hacking_monitor_stop
    for alert in alerts:
        action = " Stopping training (reward_hacking_monitor_stop)." if stop else ""
        warnings.warn(f"step {alert.step}: {alert.kind}: {alert.message}{action}", RewardHackingWarning, stacklevel=2)
    if stop:
        control.should_training_stop = True
