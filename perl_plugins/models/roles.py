"""Named roles on one frozen base: policy and reward are adapters, the reference is adapters off."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: plugins import this module while they are only listed
    import torch.nn as nn


class UnknownRoleError(KeyError):
    """A role name this model does not have."""

    def __str__(self) -> str:  # KeyError would print the message with quotes
        return str(self.args[0])


class Roles:
    """Role name -> adapter name (``None`` means the bare base) on a single ``PeftModel``.

    Every role runs the same base weights, so no role keeps a copy of them::

        roles = Roles(model, {"policy": "default", "reference": None, "reward": "reward"})
        with roles.use("reward"):
            rewards = score(model, ids, mask)
    """

    def __init__(self, model: nn.Module, adapters: dict[str, str | None]) -> None:
        missing = [a for a in adapters.values() if a is not None and a not in model.peft_config]
        if missing:
            raise UnknownRoleError(f"Adapters {missing} are not loaded on the model (has {list(model.peft_config)}).")
        self.model = model
        self.adapters = dict(adapters)

    @property
    def names(self) -> list[str]:
        return list(self.adapters)

    def adapter(self, role: str) -> str | None:
        if role not in self.adapters:
            raise UnknownRoleError(f"Unknown role {role!r}; this model's roles are {self.names}.")
        return self.adapters[role]

    @contextmanager
    def use(self, role: str) -> Iterator[nn.Module]:
        """Run the body with ``role`` active, then restore the adapter (and trainability) before."""
        adapter = self.adapter(role)
        if adapter is None:
            with self.model.disable_adapter():
                yield self.model
            return
        previous = self.model.active_adapter
        if adapter == previous:
            yield self.model
            return
        # set_adapter() makes the adapter it activates trainable: switch in inference mode and give
        # the previous adapter back the trainability it had.
        previous_trainable = any(p.requires_grad for n, p in self.model.named_parameters() if f".{previous}." in n)
        self.model.set_adapter(adapter, inference_mode=True)
        try:
            yield self.model
        finally:
            self.model.set_adapter(previous, inference_mode=not previous_trainable)


def roles(trainer: Any) -> Roles:
    """The :class:`Roles` the ``lora`` plugin set up on ``trainer`` (``with roles(t).use("reward")``)."""
    attached = getattr(trainer, "perl_plugins", None)
    found = attached.state.get("lora") if attached is not None else None
    if found is None:
        from perl_plugins.errors import PluginIncompatibleError

        raise PluginIncompatibleError("This trainer has no roles: attach the 'lora' plugin first.")
    return found
