"""The embedded base of one cross-validation fold, shared by the benchmarks that cross-validate.

The shipped base has read the texts (never the labels) of every train row, so a fold scored with
it would be scored on text it memorised; each fold gets a base pre-trained the same way without
that fold (``recipes/pretrain_base.py --heldout fold:I/K``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from perl_plugins.recipes import pretrain_base

from perl_plugins.data.defaults import parse_fold


def fold_base(fold_bases: str | Path, heldout: str) -> str:
    """``fold_bases/fold-I-of-K``: the base pre-trained without fold ``heldout`` (``fold:I/K``),
    built with the pre-training recipe's YAML when missing (~15 min on one core)."""
    fold, folds = parse_fold(heldout)
    out = Path(fold_bases) / f"fold-{fold}-of-{folds}"
    if not (out / "card.json").is_file():
        recipe = Path(pretrain_base.__file__)
        cmd = [sys.executable, str(recipe), "--config", str(recipe.with_suffix(".yaml"))]
        print(f"[folds] pre-training the base of {heldout} into {out} (~15 min)", flush=True)
        subprocess.run([*cmd, "--heldout", heldout, "--output_dir", str(out)], check=True)
    built = json.loads((out / "card.json").read_text())["data"]["heldout"]
    if built != heldout:
        raise SystemExit(f"{out} holds a base pre-trained with heldout {built!r}, not {heldout!r}: remove it.")
    return str(out)
