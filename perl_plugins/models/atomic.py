"""Atomic directory writes: a directory is written under a hidden sibling name and renamed into
place, so no reader ever sees half of it. The model caches (embedded base, tokenizer, SmolLM2)
use it as it is; checkpoints (:mod:`perl_plugins.checkpoint.store`) add hashing, fsync and a
manifest on top. It sits in ``models``, the lowest layer that writes directories."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import secrets
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: Names of directories being written (or deleted): debris when a process died meanwhile.
TMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def atomic_dir(final_dir: str | os.PathLike, *, replace: bool = True) -> Iterator[Path]:
    """Yield a new empty sibling ``.tmp-<name>-<random>`` of ``final_dir``; on clean exit rename it
    to ``final_dir``, on any exception remove it and re-raise.

    An existing ``final_dir`` is replaced (``replace=True``) by an atomic exchange (Linux
    ``renameat2``); where unsupported the old one is renamed aside first, so a complete copy always
    exists. With ``replace=False`` an existing ``final_dir`` wins and ours is dropped: two
    processes racing to fill one cache entry both end up with one complete copy.
    """
    final = Path(final_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{TMP_PREFIX}{final.name}-{secrets.token_hex(4)}"
    tmp.mkdir()  # not tempfile.mkdtemp: its 0700 mode would stick to the result
    try:
        yield tmp
        if replace:
            _commit(tmp, final)
        else:
            _commit_unless_present(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _commit_unless_present(tmp: Path, final: Path) -> None:
    try:
        tmp.rename(final)
    except OSError:
        if not final.is_dir():
            raise  # a real failure, not a lost race (the winner's copy is as good as ours)
        shutil.rmtree(tmp, ignore_errors=True)


def _commit(tmp: Path, final: Path) -> None:
    old = None
    if final.exists():
        if _exchange(tmp, final):
            old = tmp  # now holds the previous copy
        else:
            old = final.with_name(f"{TMP_PREFIX}{final.name}-old-{secrets.token_hex(4)}")
            final.rename(old)
            tmp.rename(final)
    else:
        tmp.rename(final)
    fsync_dir(final.parent)  # the new name must be durable before the old copy goes
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def fsync_dir(path: Path) -> None:
    """Make ``path``'s directory entries durable (POSIX)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@functools.cache
def _renameat2() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    func = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # glibc >= 2.28
    if func is not None:
        func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        func.restype = ctypes.c_int
    return func


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths; False where the OS or filesystem can't."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))
