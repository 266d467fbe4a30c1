"""Full parameter values under DeepSpeed ZeRO-3 (no-op elsewhere), for reading a model's weights
(fingerprints, reward adapters); the checkpoint layer's ZeRO state gathering builds on it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

from perl_plugins.lazy import lazy_import

torch = lazy_import("torch")


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor]) -> Iterator[None]:
    """Inside the block, ZeRO-3 parameters among ``params`` hold their full value (read-only);
    other parameters are left as they are."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if partitioned:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        # Already-gathered ones are left alone: re-partitioning them on exit would pull them from
        # under an enclosing gather.
        partitioned = [p for p in partitioned if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield
