"""Named, weighted loss terms: the object ``perl_compute_loss`` implementations extend."""

from __future__ import annotations

from collections import defaultdict

from perl_plugins.lazy import lazy_import

torch = lazy_import("torch")  # imported on first use: the host imports this module while plugins are only listed


class LossTerms:
    """An ordered set of named loss terms; the trainer optimizes ``sum(weight * value)``.

    The stock loss enters as the first term with weight 1. Plugins add terms or re-weight
    existing ones (GRM: ``reward_loss`` * (1 - alpha) + ``grm_reg_loss`` * alpha).
    """

    def __init__(self, base_name: str, base_loss: torch.Tensor) -> None:
        self.base_name = base_name
        self._terms: dict[str, list] = {base_name: [base_loss, 1.0]}

    def add(self, name: str, value: torch.Tensor, weight: float = 1.0) -> None:
        """Add a new term; a name may only be used once per step."""
        if name in self._terms:
            raise KeyError(f"loss term {name!r} was already added this step")
        self._terms[name] = [value, float(weight)]

    def reweight(self, name: str, weight: float) -> None:
        """Set the weight of an existing term (e.g. the stock loss)."""
        self._terms[name][1] = float(weight)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._terms[name][0]

    def __contains__(self, name: str) -> bool:
        return name in self._terms

    def names(self) -> list[str]:
        return list(self._terms)

    def total(self, added_scale: float = 1.0) -> torch.Tensor:
        """The loss to back-propagate. A lone unit-weight term is returned as is (bitwise stock).

        ``added_scale`` multiplies every term but the stock one: the host passes
        ``1 / accumulation steps`` where the trainer does not divide the total itself."""
        items = list(self._terms.values())
        if len(items) == 1 and items[0][1] == 1.0:
            return items[0][0]
        (base, base_weight), *added = items
        return base_weight * base + sum(added_scale * weight * value for value, weight in added)

    def detached(self) -> dict[str, float]:
        """Unweighted values of every term, for logging."""
        return {name: value.detach().float().mean().item() for name, (value, _) in self._terms.items()}


class LossTermRecorder:
    """Accumulates per-step term values and hands their means to the trainer's next log call."""

    def __init__(self) -> None:
        self._values: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    def record(self, terms: LossTerms, training: bool) -> None:
        buffer = self._values["train" if training else "eval"]
        for name, value in terms.detached().items():
            buffer[name].append(value)

    def flush(self, logs: dict[str, float]) -> None:
        """Add the means recorded since the last flush to ``logs`` (``eval_`` prefix for evaluation)."""
        evaluating = any(key.startswith("eval_") for key in logs)
        buffer = self._values["eval" if evaluating else "train"]
        prefix = "eval_" if evaluating else ""
        for name, values in buffer.items():
            if values:
                logs[prefix + name] = sum(values) / len(values)
        buffer.clear()
