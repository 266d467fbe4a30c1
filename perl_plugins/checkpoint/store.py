"""Storage layer of the ``adapter_ckpt`` plugin: atomic, self-verifying checkpoint dirs.

A checkpoint is a directory (``<output_dir>/checkpoint-<step>``) that is written
under a hidden sibling name (``.tmp-<name>-<random>``) and renamed into place
only after every file is fsynced and :data:`MANIFEST_NAME` is written last.  The
manifest lists each file's sha256 and size, plus caller metadata (base
fingerprint, plugins and options, :func:`library_versions`, trainer class).  So:

* a directory named ``checkpoint-<step>`` with a parseable manifest is complete
  (:func:`is_complete`); one without is a crash leftover or a foreign checkpoint;
* :func:`verify_checkpoint` proves the files are the ones written and that the
  checkpoint belongs to the given base model;
* ``.tmp-*`` directories are debris of crashed saves (or deletions) and are
  removed by :func:`prune_checkpoints`.

Single writer: one process owns an :func:`atomic_checkpoint_dir`; in distributed
training other ranks must write into its temporary path (broadcast it) before
the owner leaves the ``with`` block, and pruning must not run concurrently with
another process's save.  Durability relies on POSIX ``fsync`` of files and
directories (Linux, macOS).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import random
import re
import secrets
import shutil
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from perl_plugins.lazy import lazy_import
from perl_plugins.models.atomic import TMP_PREFIX, atomic_dir, fsync_dir
from perl_plugins.models.fingerprint import (
    base_fingerprint,
    describe_base,
    fingerprint_differences,
)

# Imported on first use: the adapter_ckpt plugin imports this module while plugins are only listed.
np = lazy_import("numpy")
torch = lazy_import("torch")
safetensors_torch = lazy_import("safetensors.torch")

__all__ = [
    "MANIFEST_NAME",
    "MANIFEST_FORMAT",
    "SAVE_DELAY_ENV",
    "CheckpointError",
    "ChecksumMismatchError",
    "MissingFileError",
    "BaseMismatchError",
    "IncompleteCheckpointError",
    "base_fingerprint",
    "atomic_checkpoint_dir",
    "library_versions",
    "is_complete",
    "read_manifest",
    "latest_complete_checkpoint",
    "verify_checkpoint",
    "save_tensors",
    "load_tensors",
    "rng_state_filename",
    "save_rng_state",
    "load_rng_state",
    "prune_checkpoints",
    "prune_to_limit",
]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "perl_manifest.json"
MANIFEST_FORMAT = 1
#: Test-only hook: seconds to sleep while committing a checkpoint, after half of
#: its files are hashed/fsynced and before the manifest and rename, so a test can
#: kill the process mid-save.  Never set it in real runs.
SAVE_DELAY_ENV = "PERL_PLUGINS_TEST_SAVE_DELAY"
_CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")
_HASH_CHUNK = 1 << 20
# Temp dirs of saves in flight in this process; prune must not delete them.
_ACTIVE_TMP_DIRS: set[Path] = set()


class CheckpointError(ValueError):
    """A checkpoint is unusable; subclasses say why."""


class IncompleteCheckpointError(CheckpointError):
    """No (readable) manifest: the save never finished, or this is not our checkpoint."""


class MissingFileError(CheckpointError):
    """A file the checkpoint needs is absent; ``file`` names it."""

    def __init__(self, file: str | os.PathLike, where: str | os.PathLike | None = None) -> None:
        self.file = str(file)
        super().__init__(f"{where}: missing file {self.file}" if where else f"missing file {self.file}")


class ChecksumMismatchError(CheckpointError):
    """A file's content differs from what the manifest recorded; ``file`` names it."""

    def __init__(self, file: str, where: str | os.PathLike, detail: str) -> None:
        self.file = file
        super().__init__(f"{where}: {file} is corrupt ({detail})")


class BaseMismatchError(CheckpointError):
    """The checkpoint was trained on another base model than the one given."""

    def __init__(self, where: str | os.PathLike, checkpoint_base: dict | None, given_base: dict) -> None:
        self.checkpoint_base = checkpoint_base
        self.given_base = given_base
        if checkpoint_base is None:
            message = f"{where} records no base fingerprint to check against {describe_base(given_base)}"
        else:
            diffs = fingerprint_differences(checkpoint_base, given_base)
            message = (
                f"{where} was saved for base model {describe_base(checkpoint_base)}, "
                f"but the given base model is {describe_base(given_base)}"
                + (f"; they differ in {'; '.join(diffs)}" if diffs else "")
                + ". Load the base model the adapter was trained on."
            )
        super().__init__(message)


@contextlib.contextmanager
def atomic_checkpoint_dir(final_dir: str | os.PathLike, metadata: Mapping[str, Any] | None = None) -> Iterator[Path]:
    """Yield a temporary sibling directory of ``final_dir``; commit it on clean exit.

    On clean exit: every file is hashed and fsynced, the manifest (``metadata``
    merged at top level; it is read at exit, so the body may still add to it) is
    written last, directories are fsynced, and the directory is renamed to
    ``final_dir``.  An existing ``final_dir`` is replaced by an atomic exchange
    (Linux ``renameat2``); where unsupported the old one is renamed aside first,
    so a complete copy always exists.  On any exception the temporary directory
    is removed and the exception propagates.
    """
    active_key = None
    try:
        with atomic_dir(final_dir) as tmp:
            active_key = tmp.resolve()
            _ACTIVE_TMP_DIRS.add(active_key)
            yield tmp
            _write_manifest(tmp, dict(metadata or {}))
    finally:
        _ACTIVE_TMP_DIRS.discard(active_key)


def library_versions() -> dict[str, str]:
    """Versions of Python and the installed libraries a checkpoint depends on."""
    versions = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "trl", "peft", "accelerate", "safetensors"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[dist] = importlib.metadata.version(dist)
    # From the package itself: a source checkout need not be pip-installed.
    own_version = getattr(sys.modules.get("perl_plugins"), "__version__", None)
    if own_version:
        versions["perl_plugins"] = own_version
    return versions


def is_complete(path: str | os.PathLike) -> bool:
    """True if ``path`` is a committed checkpoint: not a temp dir, manifest parseable.

    Cheap (no hashing); use :func:`verify_checkpoint` to check contents.
    """
    path = Path(path)
    if path.name.startswith(TMP_PREFIX):
        return False
    try:
        read_manifest(path)
    except CheckpointError:
        return False
    return True


def latest_complete_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete ``checkpoint-<step>`` directory with the highest step, or None."""
    for _, path in reversed(_checkpoint_dirs(output_dir)):
        if is_complete(path):
            return path
    return None


def verify_checkpoint(path: str | os.PathLike, *, expected_base: dict | None = None) -> dict[str, Any]:
    """Check every file against the manifest (and the base model) and return the manifest.

    Raises :class:`IncompleteCheckpointError`, :class:`MissingFileError`,
    :class:`ChecksumMismatchError`, or, when ``expected_base`` (a
    :func:`base_fingerprint` of the model about to be used) is given and its id
    differs from the manifest's ``base_fingerprint``, :class:`BaseMismatchError`.
    Files not listed in the manifest are not verified; they are logged as a
    warning and otherwise ignored (e.g. files another tool added later).
    """
    path = Path(path)
    manifest = read_manifest(path)
    if manifest["format"] != MANIFEST_FORMAT:
        raise CheckpointError(f"{path}: unsupported manifest format {manifest['format']!r} (want {MANIFEST_FORMAT})")
    if expected_base is not None:
        # Before hashing: a wrong base is the likelier and cheaper error to report.
        recorded = manifest.get("base_fingerprint")
        if not isinstance(recorded, dict) or recorded.get("id") != expected_base.get("id"):
            raise BaseMismatchError(path, recorded if isinstance(recorded, dict) else None, expected_base)
    for rel, entry in manifest["files"].items():
        file = path / rel
        if not file.is_file():
            raise MissingFileError(rel, path)
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise ChecksumMismatchError(rel, path, f"{size} bytes, manifest says {entry['bytes']}")
        digest = _sha256_file(file)
        if digest != entry["sha256"]:
            raise ChecksumMismatchError(rel, path, f"sha256 {digest[:16]}..., manifest says {entry['sha256'][:16]}...")
    extra = sorted(set(_relative_files(path)) - set(manifest["files"]) - {MANIFEST_NAME})
    if extra:
        logger.warning("%s: files not covered by %s (not verified): %s", path, MANIFEST_NAME, ", ".join(extra))
    return manifest


def save_tensors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """``safetensors.torch.save_file`` that also accepts non-contiguous and aliased tensors.

    safetensors refuses both (to avoid silently duplicating memory); adapter
    state dicts can contain transposed views or tied tensors, so copy those.
    """
    prepared: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for name, tensor in tensors.items():
        tensor = tensor.detach().contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen_storages and tensor.numel():
            tensor = tensor.clone()
        seen_storages.add(ptr)
        prepared[name] = tensor
    safetensors_torch.save_file(prepared, str(path), metadata=metadata)


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file; a missing file raises :class:`MissingFileError`."""
    if not Path(path).is_file():
        raise MissingFileError(path)
    return safetensors_torch.load_file(str(path), device=str(device))


def rng_state_filename(rank: int = 0, world_size: int = 1) -> str:
    """The file name transformers' Trainer uses, so stock resume restores ours too."""
    return "rng_state.pth" if world_size <= 1 else f"rng_state_{rank}.pth"


def save_rng_state(path: str | os.PathLike, rank: int = 0, *, world_size: int = 1) -> Path:
    """Save python, numpy, torch CPU (and CUDA) RNG states into directory ``path``.

    Same keys and file name as ``Trainer._save_rng_state``; numpy's state is
    stored as plain Python values so ``torch.load(weights_only=True)`` reads it
    without allow-listing numpy types.  Returns the file written.
    """
    np_state = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])),
        "cpu": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available():
        # Like Trainer: all devices when distributed, the current one otherwise.
        states["cuda"] = torch.cuda.random.get_rng_state_all() if world_size > 1 else torch.cuda.random.get_rng_state()
    file = Path(path) / rng_state_filename(rank, world_size)
    torch.save(states, file)
    return file


def load_rng_state(path: str | os.PathLike, rank: int = 0, *, world_size: int = 1) -> None:
    """Restore the RNG states written by :func:`save_rng_state` (or by the stock Trainer).

    A CUDA state is restored only if CUDA is available now; a missing file
    raises :class:`MissingFileError` (e.g. resuming with another world size).
    """
    file = Path(path) / rng_state_filename(rank, world_size)
    if not file.is_file():
        raise MissingFileError(file.name, path)
    states = torch.load(file, weights_only=True)
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.random.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        if isinstance(states["cuda"], (list, tuple)):
            torch.cuda.random.set_rng_state_all(states["cuda"])
        else:
            torch.cuda.random.set_rng_state(states["cuda"])


def prune_checkpoints(output_dir: str | os.PathLike, keep: int, protect: str | os.PathLike | None = None) -> list[Path]:
    """Delete complete checkpoints older than the newest ``keep``, and stale ``.tmp-*`` dirs.

    Never deletes ``protect`` (e.g. the best checkpoint or the one resumed from),
    the newest complete checkpoint, incomplete ``checkpoint-*`` dirs (they may
    belong to another tool), or temp dirs of saves in flight in this process.
    Returns the paths removed.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    removed = []
    for tmp in sorted(output_dir.glob(f"{TMP_PREFIX}*")):
        if tmp.is_dir() and tmp.resolve() not in _ACTIVE_TMP_DIRS:
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    protected = Path(protect).resolve() if protect is not None else None
    complete = [path for _, path in _checkpoint_dirs(output_dir) if is_complete(path)]
    for path in complete[:-keep]:
        if path.resolve() != protected:
            # Rename first so a crash mid-delete leaves a .tmp-* dir, never a half checkpoint.
            doomed = path.with_name(f"{TMP_PREFIX}{path.name}-deleted-{secrets.token_hex(4)}")
            path.rename(doomed)
            shutil.rmtree(doomed, ignore_errors=True)
            removed.append(path)
    return removed


def prune_to_limit(output_dir: str | os.PathLike, limit: int, best: str | os.PathLike | None) -> list[Path]:
    """The stock ``save_total_limit`` rule on complete checkpoints: at most ``limit`` kept, the newest
    and the best among them (``limit`` 1 with an older best keeps two)."""
    keep = limit
    if best is not None and limit > 1:
        complete = [path for _, path in _checkpoint_dirs(output_dir) if is_complete(path)]
        if Path(best).resolve() not in {p.resolve() for p in complete[-limit:]}:
            keep -= 1  # the best takes one of the limit's places
    return prune_checkpoints(output_dir, keep, protect=best)


def _checkpoint_dirs(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        match = _CHECKPOINT_RE.fullmatch(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((path / MANIFEST_NAME).read_text())
    except FileNotFoundError:
        raise IncompleteCheckpointError(_no_manifest_message(path)) from None
    except (OSError, ValueError) as exc:
        raise IncompleteCheckpointError(f"{path}: unreadable {MANIFEST_NAME}: {exc}") from exc
    if not isinstance(manifest, dict) or "format" not in manifest or not isinstance(manifest.get("files"), dict):
        raise IncompleteCheckpointError(f"{path}: {MANIFEST_NAME} lacks 'format' or 'files'")
    return manifest


def _no_manifest_message(path: Path) -> str:
    """Why a directory has no manifest, told apart by what it holds."""
    if not path.exists():
        return f"{path} does not exist: give a checkpoint-<step> directory written with --plugins adapter_ckpt."
    if not path.is_dir():
        return f"{path} is a file, not a checkpoint directory."
    if (path / "trainer_state.json").is_file():
        return (
            f"{path} is a checkpoint the stock Trainer wrote (no {MANIFEST_NAME}: it was saved without the "
            "adapter_ckpt plugin). It loads as it is with from_pretrained / PeftModel.from_pretrained and resumes "
            "without adapter_ckpt; `perl-plugins export` and adapter_ckpt resumes read only checkpoints saved "
            "with --plugins adapter_ckpt."
        )
    return (
        f"{path} holds no {MANIFEST_NAME}: it is not a checkpoint the adapter_ckpt plugin wrote, or that save was "
        "interrupted before it completed (adapter_ckpt writes the manifest last). Give a checkpoint-<step> "
        "directory written with --plugins adapter_ckpt."
    )


def _relative_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _sha256_file(file: Path, *, fsync: bool = False) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
        if fsync:
            os.fsync(fh.fileno())
    return digest.hexdigest()


def _write_manifest(tmp: Path, metadata: dict[str, Any]) -> None:
    reserved = {"format", "files"} & metadata.keys()
    if reserved:
        raise ValueError(f"metadata keys {sorted(reserved)} are reserved for the manifest")
    rels = [rel for rel in _relative_files(tmp) if rel != MANIFEST_NAME]
    half = len(rels) // 2
    files = {rel: _file_entry(tmp / rel) for rel in rels[:half]}
    _test_save_delay(tmp)
    files.update({rel: _file_entry(tmp / rel) for rel in rels[half:]})
    manifest = {"format": MANIFEST_FORMAT, **metadata, "files": files}
    with open(tmp / MANIFEST_NAME, "w") as fh:
        json.dump(manifest, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    # Deepest first, so each directory entry is durable before its parent's.
    for directory in sorted((p for p in tmp.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        fsync_dir(directory)
    fsync_dir(tmp)


def _file_entry(file: Path) -> dict[str, Any]:
    return {"sha256": _sha256_file(file, fsync=True), "bytes": file.stat().st_size}


def _test_save_delay(tmp: Path) -> None:
    delay = float(os.environ.get(SAVE_DELAY_ENV) or 0)
    if delay > 0:
        logger.warning("%s=%s: test hook sleeping before committing %s", SAVE_DELAY_ENV, delay, tmp)
        time.sleep(delay)
