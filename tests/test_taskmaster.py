"""Taskmaster thumbs up/down loader: shipped coffee file, other layouts, malformed rows, splits."""

import gzip
import json

import pytest

from perl_plugins.data import taskmaster as tm
from perl_plugins.data.defaults import heldout_rows
from perl_plugins.data.taskmaster import DatasetFormatError


@pytest.fixture(scope="module")
def coffee() -> list[tm.FeedbackRow]:
    return tm.load_feedback()


GOOD = {
    "conversation_id": "dlg-a",
    "context": json.dumps(
        [
            {"role": "user", "text": "one latte\nplease "},
            {"role": "agent", "api": {"get_menu_items": {"query": "latte"}}},
            {"role": "api", "response": {"get_menu_items": {"items": []}}},
        ]
    ),
    "generation": json.dumps({"role": "agent", "text": "Sorry, no latte."}),
    "reward": 0.0,
}
GOOD_PROMPT = (
    "User: one latte please\n"
    'Agent: API call: {"get_menu_items": {"query": "latte"}}\n'
    'API response: {"get_menu_items": {"items": []}}\n'
    "Agent:"
)


def test_shipped_file(coffee):
    assert len(coffee) == 3228
    assert 0.85 < sum(r.label for r in coffee) / len(coffee) < 0.87
    assert {r.label for r in coffee} == {0, 1}
    assert all(r.prompt == "Agent:" or r.prompt.endswith("\nAgent:") for r in coffee)
    assert all(r.completion.startswith(" ") for r in coffee)
    api_call = coffee[1]
    assert api_call.prompt.splitlines()[1] == "User: can i get an espresso please"
    assert api_call.prompt.splitlines()[3].startswith('API response: {"get_menu_items": ')
    assert api_call.completion == (' API call: {"add_order_item": {"menu_item_id": "espresso-0001", "quantity": "1"}}')


def test_render_turn():
    assert tm.render_turn({"role": "user", "text": " a\n b "}) == "User: a b"
    assert tm.render_turn({"role": "agent", "text": "ok"}) == "Agent: ok"
    api_call = tm.render_turn({"role": "agent", "api": {"f": {"x": 1}}})
    assert api_call == 'Agent: API call: {"f": {"x": 1}}'
    assert tm.render_turn({"role": "api", "response": {"f": []}}) == 'API response: {"f": []}'
    for bad in ({"role": "api", "text": "x"}, {"role": "user"}, ["user", "hi"]):
        with pytest.raises(ValueError):
            tm.render_turn(bad)


def test_pairs_and_pointwise(coffee):
    pairs = tm.preference_pairs(coffee)
    assert pairs.column_names == ["prompt", "chosen", "rejected"]
    assert len(pairs) == 617 and len(set(pairs["prompt"])) == 220
    labels = {(r.prompt, r.completion): r.label for r in coffee}
    assert all(labels[p, c] == 1 and labels[p, x] == 0 for p, c, x in zip(*pairs[:].values()))

    points = tm.pointwise(coffee[:5])
    assert points.column_names == ["prompt", "completion", "label"]
    assert points[0] == {"prompt": coffee[0].prompt, "completion": coffee[0].completion, "label": 1}
    assert len(tm.preference_pairs([])) == 0


def test_other_layouts(tmp_path):
    decoded = {**GOOD, "context": json.loads(GOOD["context"]), "reward": 1}
    (tmp_path / "array.json").write_text(json.dumps([GOOD, decoded], indent=2))
    (tmp_path / "rows.jsonl").write_text(json.dumps(GOOD) + "\n\n" + json.dumps(decoded) + "\n")
    with gzip.open(tmp_path / "array.gz", "wt") as f:  # gzip is detected from content, not name
        json.dump([GOOD, decoded], f)
    for name in ("array.json", "rows.jsonl", "array.gz"):
        rows = tm.load_feedback(tmp_path / name)
        assert [r.label for r in rows] == [0, 1]
        assert rows[0] == tm.FeedbackRow("dlg-a", GOOD_PROMPT, " Sorry, no latte.", 0)
        assert rows[1].prompt == GOOD_PROMPT


@pytest.mark.parametrize(
    "row, problem",
    [
        ('{"conversation_id": "x", ', "invalid JSON"),
        (json.dumps(["not", "an", "object"]), "expected a JSON object"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "reward"}), "missing key(s): reward"),
        (json.dumps({**GOOD, "reward": 0.5}), "reward must be 0 or 1"),
        (json.dumps({**GOOD, "reward": "1"}), "reward must be 0 or 1"),
        (json.dumps({**GOOD, "conversation_id": 7}), "conversation_id must be"),
        (json.dumps({**GOOD, "context": "{}"}), "context must be a JSON list"),
        (json.dumps({**GOOD, "context": "[{"}), "context is not valid JSON"),
        (
            json.dumps({**GOOD, "context": [{"role": "robot", "text": "hi"}]}),
            "context turn 1: unsupported turn",
        ),
        (
            json.dumps({**GOOD, "generation": {"role": "user", "text": "hi"}}),
            "generation must be an agent turn",
        ),
    ],
)
def test_malformed_row_names_file_and_row(tmp_path, row, problem):
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{json.dumps(GOOD)}\n{json.dumps(GOOD)}\n{row}\n")
    with pytest.raises(DatasetFormatError) as err:
        tm.load_feedback(path)
    assert str(err.value).startswith(f"{path}: row 3: ")
    assert problem in str(err.value)


def test_malformed_files(tmp_path):
    array = tmp_path / "bad.json"
    array.write_text(json.dumps([GOOD, {**GOOD, "reward": 2}]))
    with pytest.raises(DatasetFormatError, match=r"bad\.json: row 2: reward must be 0 or 1"):
        tm.load_feedback(array)
    array.write_text("[" + json.dumps(GOOD) + ",\n{")
    with pytest.raises(DatasetFormatError, match=r"bad\.json: invalid JSON array at line 2"):
        tm.load_feedback(array)
    array.write_text("\n")
    with pytest.raises(DatasetFormatError, match="no rows"):
        tm.load_feedback(array)
    assert issubclass(DatasetFormatError, ValueError)


def test_split_ids_deterministic_and_disjoint():
    ids = [f"dlg-{i}" for i in range(2000)]
    train, test = tm.split_ids(ids, test_fraction=0.2, seed=3)
    assert not set(train) & set(test) and set(train) | set(test) == set(ids)
    assert 0.15 < len(test) / len(ids) < 0.25
    train_rev, test_rev = tm.split_ids(reversed(ids), test_fraction=0.2, seed=3)
    assert set(test_rev) == set(test) and set(train_rev) == set(train)
    assert set(tm.split_ids(ids, test_fraction=0.2, seed=4)[1]) != set(test)
    assert tm.split_ids(ids, test_fraction=0.0)[1] == [] and tm.split_ids(ids, 1.0)[0] == []
    with pytest.raises(ValueError):
        tm.split_ids(ids, test_fraction=1.5)


def test_load_splits(coffee):
    splits = tm.load_splits()
    train, test = splits["train"], splits["test"]
    assert len(train) + len(test) == len(coffee)
    assert 0.05 < len(test) / len(coffee) < 0.15
    assert not {r.conversation_id for r in train} & {r.conversation_id for r in test}
    # The coffee file repeats contexts under new ids; they must not straddle the split.
    assert not {r.prompt for r in train} & {r.prompt for r in test}
    assert tm.load_splits() == splits
    assert tm.load_splits(seed=1)["test"] != test


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coffee_split_does_not_leak(coffee, seed):
    splits = tm.load_splits(seed=seed)
    assert tm.count_leaks(splits["train"], splits["test"]) == {"prefix_rows": 0, "shared_ids": 0, "shared_prompts": 0}


def _leaky_file(path, dialogs=60):
    """Each dialog rated after every agent turn, each rating under its own id (as TM-3 does); all
    dialogs open alike, so linking on the opening would put every row in one group."""
    opening = [
        {"role": "agent", "text": "Welcome to the Coffee Bar. What can I get for you?"},
        {"role": "user", "text": "Hi, I'd like to order a coffee"},
    ]
    lines = []
    for d in range(dialogs):
        turns = list(opening)
        for t in range(5):
            turns.append({"role": "agent", "text": f"Which size for drink {d}, step {t}?"})
            turns.append({"role": "user", "text": f"size {d * 7 + t} please"})
        for n in range(2, len(turns) + 1, 2):
            lines.append(
                json.dumps(
                    {
                        "conversation_id": f"dlg-{d}-{n}",
                        "context": json.dumps(turns[:n]),
                        "generation": json.dumps({"role": "agent", "text": f"Noted {d}/{n}."}),
                        "reward": float((d + n) % 3 != 0),
                    }
                )
            )
    path.write_text("\n".join(lines) + "\n")
    return path


def test_leaky_file_split_is_leak_free_without_one_big_group(tmp_path):
    path = _leaky_file(tmp_path / "leaky.jsonl")
    rows = tm.load_feedback(path)
    for seed in range(3):
        splits = tm.load_splits(path, test_fraction=0.3, seed=seed)
        assert splits["test"] and splits["train"]
        assert tm.count_leaks(splits["train"], splits["test"]) == {
            "prefix_rows": 0,
            "shared_ids": 0,
            "shared_prompts": 0,
        }
    # Rows of one dialog travel together; the shared two-turn opening does not merge dialogs
    # (its rows, with the very same prompt, form one group of their own).
    group = tm.split_groups(rows)
    dialog_of = {r.conversation_id: r.conversation_id.split("-")[1] for r in rows}
    long_rows = [r for r in rows if len(tm.context_turns(r)) >= 4]
    for dialog in set(dialog_of.values()):
        assert len({group[r.conversation_id] for r in long_rows if dialog_of[r.conversation_id] == dialog}) == 1
    assert len({group[r.conversation_id] for r in long_rows}) == 60
    assert len(set(group.values())) == 61
    # A split by conversation id alone leaks: count_leaks sees it.
    train_ids, _ = tm.split_ids(sorted(r.conversation_id for r in rows), 0.3, 0)
    naive_train = [r for r in rows if r.conversation_id in set(train_ids)]
    naive_test = [r for r in rows if r.conversation_id not in set(train_ids)]
    assert tm.count_leaks(naive_train, naive_test)["prefix_rows"] > 10


def test_split_is_deterministic_and_order_free(tmp_path):
    path = _leaky_file(tmp_path / "leaky.jsonl")
    splits = tm.load_splits(path, test_fraction=0.3, seed=5)
    assert tm.load_splits(path, test_fraction=0.3, seed=5) == splits
    shuffled = tmp_path / "shuffled.jsonl"
    shuffled.write_text("\n".join(reversed(path.read_text().splitlines())) + "\n")
    rev = tm.load_splits(shuffled, test_fraction=0.3, seed=5)
    assert {r.conversation_id for r in rev["test"]} == {r.conversation_id for r in splits["test"]}


def test_load_dialog_texts(tmp_path):
    texts = tm.load_dialog_texts()
    assert len(texts) == 3710
    assert texts[0].splitlines()[:2] == [
        "User: one Chai Latte please",
        "Agent: is the order displayed correct and ready to send off to be made?",
    ]
    assert all(line.startswith(("User: ", "Agent: ")) for t in texts for line in t.splitlines())
    bad = tmp_path / "dialogs.jsonl"
    bad.write_text(json.dumps({"utterances": [{"speaker": "narrator", "text": "x"}]}) + "\n")
    with pytest.raises(DatasetFormatError, match=r"dialogs\.jsonl: row 1: utterance 1"):
        tm.load_dialog_texts(bad)


def test_folds_partition_the_rows_leak_free(tmp_path):
    """K-fold cross-validation: each row is held out exactly once, each fold leak-free against the
    rest, the same folds whatever the row order; ``heldout_rows`` names a fold as fold:I/K."""
    path = _leaky_file(tmp_path / "leaky.jsonl")
    rows = tm.load_feedback(path)
    folds = [tm.fold_rows(rows, i, 4, seed=2) for i in range(4)]
    held = [r.conversation_id for f in folds for r in f["test"]]
    assert sorted(held) == sorted(r.conversation_id for r in rows)
    for f in folds:
        assert f["test"] and len(f["train"]) + len(f["test"]) == len(rows)
        assert tm.count_leaks(f["train"], f["test"]) == {"prefix_rows": 0, "shared_ids": 0, "shared_prompts": 0}
    assert tm.fold_rows(list(reversed(rows)), 1, 4, seed=2)["test"] == list(reversed(folds[1]["test"]))
    assert tm.fold_rows(rows, 1, 4, seed=3)["test"] != folds[1]["test"]
    assert heldout_rows(path, "fold:1/4", seed=2) == folds[1]
    for fold, k in ((4, 4), (-1, 4), (0, 1)):
        with pytest.raises(ValueError, match="fold"):
            tm.fold_rows(rows, fold, k)
    for bad in ("fold:4/4", "fold:1", "fold:a/3", "fold:0/1"):
        with pytest.raises(ValueError, match=r"expected fold:I/K"):
            heldout_rows(path, bad)
    with pytest.raises(ValueError, match="heldout must be one of"):
        heldout_rows(path, "folds")
