"""Loader for the Taskmaster thumbs up/down feedback format.

Reads any file of that format: the shipped Taskmaster Coffee set (TM-4-2024) or the Taskmaster
Ticketing set (TM-3-2020/reward), gzip'd or not, as one JSON array or as JSON lines. Each row has
``conversation_id``, ``context`` (a list of turns, possibly as a JSON string), ``generation`` (one
agent turn, possibly as a JSON string) and ``reward`` (1 thumbs up, 0 thumbs down).

Rendering: one turn per line, whitespace inside a text collapsed to single spaces::

    Agent: Welcome to the Coffee Bar ... What can I get for you?
    User: can i get an espresso please
    Agent: API call: {"get_menu_items": {"query": "espresso"}}
    API response: {"get_menu_items": {"items": [...]}}
    Agent:

The prompt is the rendered context plus a final ``Agent:`` line; the completion is the rest of the
rendered generation line, leading space included (``" Sure, ..."`` or ``" API call: {...}"``), so
prompt + completion is exactly the line the turn renders to and a byte-level BPE tokenizes both
alike. Completions carry no EOS: trl appends it to prompt/completion data itself.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import datasets

_HERE = Path(__file__).resolve().parent
DEFAULT_REWARD_FILE = _HERE / "taskmaster_coffee_reward.jsonl.gz"
DEFAULT_DIALOGS_FILE = _HERE / "taskmaster_coffee_dialogs.jsonl.gz"

AGENT_PREFIX = "Agent:"
_DIALOG_ROLES = {"user": "user", "assistant": "agent", "agent": "agent"}
T = TypeVar("T")


class DatasetFormatError(ValueError):
    """A data file that does not follow the Taskmaster format; the message names file and row."""


@dataclass(frozen=True)
class FeedbackRow:
    """One rated agent turn: ``prompt`` ends with ``Agent:``, ``completion`` continues it."""

    conversation_id: str
    prompt: str
    completion: str
    label: int


def _json(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)


def render_turn(turn: Mapping[str, Any]) -> str:
    """Render one Taskmaster turn as one line of text.

    ``{"role": "user", "text": t}`` -> ``User: t``;
    ``{"role": "agent", "text": t}`` -> ``Agent: t``;
    ``{"role": "agent", "api": a}`` -> ``Agent: API call: <a as JSON>``;
    ``{"role": "api", "response": r}`` -> ``API response: <r as JSON>``.
    Raises ValueError for any other shape.
    """
    if not isinstance(turn, Mapping):
        raise ValueError(f"a turn must be a JSON object, got {type(turn).__name__}")
    role, text = turn.get("role"), turn.get("text")
    if role in ("user", "agent") and isinstance(text, str):
        # One line per turn keeps the "Speaker:" structure unambiguous for a small LM.
        return f"{'User' if role == 'user' else 'Agent'}: {' '.join(text.split())}".rstrip()
    if role == "agent" and "api" in turn:
        return f"Agent: API call: {_json(turn['api'])}"
    if role == "api" and "response" in turn:
        return f"API response: {_json(turn['response'])}"
    raise ValueError(f"unsupported turn {_json(turn)[:100]} (expected user text, agent text or api call, api response)")


def _read_records(path: Path) -> list[tuple[int, Any]]:
    """Parse a (gzip'd) JSON array or JSON lines file into (1-based row number, value) pairs.

    For JSON lines the row number is the line number (blank lines are skipped but counted), so it
    points at the line to open in an editor.
    """
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic: trust content, not the file name
        raw = gzip.decompress(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DatasetFormatError(f"{path}: not UTF-8 text ({e})") from None
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DatasetFormatError(
                f"{path}: invalid JSON array at line {e.lineno}, column {e.colno}: {e.msg}"
            ) from None
        out = list(enumerate(records, 1))
    else:
        out = []
        # split("\n"), not splitlines(): JSON strings may hold raw U+2028 and other line breaks.
        for lineno, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                out.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DatasetFormatError(f"{path}: row {lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not out:
        raise DatasetFormatError(f"{path}: no rows")
    return out


def _embedded_json(value: Any, name: str, kind: type) -> Any:
    """The Taskmaster files store context/generation as JSON strings; accept decoded values too."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{name} is not valid JSON ({e.msg})") from None
    if not isinstance(value, kind):
        want = "list" if kind is list else "object"
        raise ValueError(f"{name} must be a JSON {want}, got {type(value).__name__}")
    return value


def _feedback_row(rec: Any) -> FeedbackRow:
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    missing = [k for k in ("conversation_id", "context", "generation", "reward") if k not in rec]
    if missing:
        raise ValueError(f"missing key(s): {', '.join(missing)}")
    cid = rec["conversation_id"]
    if not isinstance(cid, str) or not cid:
        raise ValueError(f"conversation_id must be a non-empty string, got {cid!r}")
    reward = rec["reward"]
    if isinstance(reward, bool) or not isinstance(reward, (int, float)) or reward not in (0, 1):
        raise ValueError(f"reward must be 0 or 1, got {reward!r}")
    lines = []
    for i, turn in enumerate(_embedded_json(rec["context"], "context", list), 1):
        try:
            lines.append(render_turn(turn))
        except ValueError as e:
            raise ValueError(f"context turn {i}: {e}") from None
    generation = _embedded_json(rec["generation"], "generation", dict)
    if generation.get("role") != "agent":
        raise ValueError(f"generation must be an agent turn, got role {generation.get('role')!r}")
    completion = render_turn(generation)[len(AGENT_PREFIX) :]
    return FeedbackRow(cid, "\n".join([*lines, AGENT_PREFIX]), completion, int(reward))


def load_feedback(path: str | Path | None = None) -> list[FeedbackRow]:
    """Load a Taskmaster thumbs up/down file (default: the shipped coffee set, 3,228 rows).

    Raises DatasetFormatError naming the file, the 1-based row and what is wrong.
    """
    return _parse_records(path, DEFAULT_REWARD_FILE, _feedback_row)


def _parse_records(path: str | Path | None, default: Path, parse: Callable[[Any], T]) -> list[T]:
    """``parse`` on each record of ``path`` (``default`` if None); a ``ValueError`` becomes a
    DatasetFormatError naming the file and the 1-based row."""
    path = Path(path) if path is not None else default
    out = []
    for n, rec in _read_records(path):
        try:
            out.append(parse(rec))
        except ValueError as e:
            raise DatasetFormatError(f"{path}: row {n}: {e}") from None
    return out


def split_ids(ids: Iterable[str], test_fraction: float = 0.1, seed: int = 0) -> tuple[list[str], list[str]]:
    """Split unique ids into (train, test), deterministically and independently of their order.

    An id goes to test when sha256(f"{seed}:{id}"), read as a fraction of 2**64, is below
    ``test_fraction``: stable across Python runs (unlike ``hash``), so the test share is
    ``test_fraction`` only on average. Both lists keep the first-seen order of ``ids``.
    """
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be within [0, 1], got {test_fraction}")
    train: list[str] = []
    test: list[str] = []
    for i in dict.fromkeys(ids):
        (test if _unit_hash(i, seed) < test_fraction else train).append(i)
    return train, test


def _unit_hash(i: str, seed: int) -> float:
    """sha256(f"{seed}:{i}") read as a fraction of 2**64: a stable, order-free place in [0, 1)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{i}".encode()).digest()[:8], "big") / 2**64


LEAK_TURNS = 4
"""Shared whole turns (two exchanges) that make two contexts one dialog for the split."""


def context_turns(row: FeedbackRow) -> list[str]:
    """The rendered context turns of a row (its prompt without the final ``Agent:`` line)."""
    return row.prompt.split("\n")[:-1]  # render_turn never emits a raw "\n" inside a turn


def split_groups(rows: Iterable[FeedbackRow], turns: int = LEAK_TURNS) -> dict[str, str]:
    """Map each conversation id to its split group, named by the group's smallest id.

    Rows are one group when they share a conversation id, a whole prompt, or their first ``turns``
    context turns. Files in this format rate one dialog at many turns, each under its own id, and
    each rated context repeats the turns before it: a later turn's context starts with every
    earlier one, so sharing the first ``turns`` turns is what marks one dialog. Shorter shared
    openings ("Hi, I'd like a coffee") are common to many dialogs and do not link rows: linking
    on them would chain most of the file into one group.
    """
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    first_id_of_key: dict[tuple[str, str], str] = {}
    for r in rows:
        ctx = context_turns(r)
        keys = [("prompt", r.prompt)]
        if len(ctx) >= turns:
            keys.append(("dialog", "\n".join(ctx[:turns])))
        for key in keys:
            a = find(r.conversation_id)
            b = find(first_id_of_key.setdefault(key, r.conversation_id))
            if a != b:  # linking to the smaller root keeps every root the smallest id of its group
                parent[max(a, b)] = min(a, b)
    return {cid: find(cid) for cid in parent}


def count_leaks(train: Iterable[FeedbackRow], test: Iterable[FeedbackRow], turns: int = LEAK_TURNS) -> dict[str, int]:
    """Ways ``test`` leaks into ``train``: ``prefix_rows``, held-out rows whose context (of at
    least ``turns`` whole turns) equals the first turns of some train context (the same dialog,
    rated at a later turn); ``shared_ids``, conversation ids on both sides; ``shared_prompts``,
    held-out prompts also in train. A leak-free split has all three at 0."""
    train, test = list(train), list(test)
    prefixes = set()
    for r in train:
        ctx = context_turns(r)
        prefixes.update("\n".join(ctx[:k]) for k in range(turns, len(ctx) + 1))
    train_prompts = {r.prompt for r in train}
    test_ids = {r.conversation_id for r in test}
    return {
        "prefix_rows": sum(len(ctx) >= turns and "\n".join(ctx) in prefixes for ctx in map(context_turns, test)),
        "shared_ids": len(test_ids & {r.conversation_id for r in train}),
        "shared_prompts": len({r.prompt for r in test} & train_prompts),
    }


def load_splits(
    path: str | Path | None = None, test_fraction: float = 0.1, seed: int = 0
) -> dict[str, list[FeedbackRow]]:
    """Load a feedback file and split it into {"train": rows, "test": rows} by dialog.

    Leak-free for any file of this format: no conversation id and no prompt is on both sides, and
    no held-out context equals the first turns (``LEAK_TURNS`` or more) of a train context
    (``count_leaks`` is all zeros; see ``split_groups``). Groups are assigned with ``split_ids``,
    so the split is deterministic and independent of row order. Coffee file, defaults: 1,326 groups;
    2,875 train and 353 test rows.
    """
    return split_rows(load_feedback(path), test_fraction, seed)


def split_rows(rows: Iterable[FeedbackRow], test_fraction: float = 0.1, seed: int = 0) -> dict[str, list[FeedbackRow]]:
    """:func:`load_splits` on rows already loaded, e.g. to carve a validation split out of train."""
    rows = list(rows)
    group = split_groups(rows)
    test_groups = set(split_ids(sorted(set(group.values())), test_fraction, seed)[1])
    return {
        "train": [r for r in rows if group[r.conversation_id] not in test_groups],
        "test": [r for r in rows if group[r.conversation_id] in test_groups],
    }


def fold_rows(rows: Iterable[FeedbackRow], fold: int, folds: int, seed: int = 0) -> dict[str, list[FeedbackRow]]:
    """Fold ``fold`` of ``folds`` for cross-validation: {"train": the other folds' rows, "test": this
    fold's}, leak-free like :func:`split_rows` (whole dialog groups; a group's fold is its place in
    [0, 1) under the hash of :func:`split_ids`, times ``folds``). The folds of one seed partition
    the rows."""
    if folds < 2 or not 0 <= fold < folds:
        raise ValueError(f"fold must be within [0, folds) and folds at least 2, got fold {fold} of {folds}")
    rows = list(rows)
    group = split_groups(rows)
    held = {g for g in set(group.values()) if int(_unit_hash(g, seed) * folds) == fold}
    return {
        "train": [r for r in rows if group[r.conversation_id] not in held],
        "test": [r for r in rows if group[r.conversation_id] in held],
    }


def pointwise(rows: Iterable[FeedbackRow], groups: Mapping[str, str] | None = None) -> datasets.Dataset:
    """Unpaired data (columns prompt, completion, label 0/1): reward classification, KTO-style.

    ``groups`` (conversation id -> dialog group, :func:`split_groups` of the untrimmed rows) adds a
    ``dialog`` column, so that cross-validation on these rows can keep each dialog in one fold."""
    rows = list(rows)
    columns = {
        "prompt": [r.prompt for r in rows],
        "completion": [r.completion for r in rows],
        "label": [r.label for r in rows],
    }
    features = {"prompt": datasets.Value("string"), "completion": datasets.Value("string")}
    features["label"] = datasets.Value("int64")
    if groups is not None:
        columns["dialog"] = [groups[r.conversation_id] for r in rows]
        features["dialog"] = datasets.Value("string")
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def preference_pairs(rows: Iterable[FeedbackRow]) -> datasets.Dataset:
    """Pairs (columns prompt, chosen, rejected): every distinct (thumbs up, thumbs down)
    completion combination rated under the same prompt.

    Grouped by prompt, not conversation id: in the coffee file each rated generation has its own
    conversation id. The whole coffee file gives 617 pairs from 220 prompts.
    """
    up: dict[str, dict[str, None]] = defaultdict(dict)  # prompt -> ordered set of completions
    down: dict[str, dict[str, None]] = defaultdict(dict)
    for r in rows:
        (up if r.label else down)[r.prompt][r.completion] = None
    pairs = [(p, c, x) for p in up if p in down for c in up[p] for x in down[p]]
    return datasets.Dataset.from_dict(
        {
            "prompt": [p for p, _, _ in pairs],
            "chosen": [c for _, c, _ in pairs],
            "rejected": [x for _, _, x in pairs],
        },
        features=datasets.Features(
            prompt=datasets.Value("string"),
            chosen=datasets.Value("string"),
            rejected=datasets.Value("string"),
        ),
    )


def _dialog_text(rec: Any) -> str:
    utterances = rec.get("utterances") if isinstance(rec, dict) else None
    if not isinstance(utterances, list):
        raise ValueError("expected a JSON object with an 'utterances' list")
    lines = []
    for i, u in enumerate(utterances, 1):
        speaker = u.get("speaker") if isinstance(u, dict) else None
        if speaker not in _DIALOG_ROLES or not isinstance(u.get("text"), str):
            raise ValueError(f"utterance {i} must have speaker user/assistant and a text")
        lines.append(render_turn({"role": _DIALOG_ROLES[speaker], "text": u["text"]}))
    return "\n".join(lines)


def load_dialog_texts(path: str | Path | None = None) -> list[str]:
    """Whole dialogs as "User: ..." / "Agent: ..." text, one string per dialog (default: the
    shipped coffee dialogs, 3,710): a corpus for tokenizer or base-model training."""
    return _parse_records(path, DEFAULT_DIALOGS_FILE, _dialog_text)
