"""``perl-plugins recipes`` and ``recipes cp``: the listing, copying like ``tune cp`` (refuses to
overwrite without --force, names what it wrote), and recipes that import only perl_plugins. The
copied recipes are run at smoke size in tests/test_recipes.py (pretrain_base here)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import pytest

from perl_plugins.cli import main as cli_main
from perl_plugins.cli.recipes import find_recipes, recipes_dir

RECIPES = ("dpo", "perl", "pretrain_base", "raft", "rlaif", "rrhf")


def test_recipes_lists_name_description_and_yaml(capsys):
    assert cli_main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert set(find_recipes()) == set(RECIPES)
    for name, recipe in find_recipes().items():
        assert f"{name}  " in out and recipe.description in out and str(recipe.config) in out
        assert recipe.description.endswith(".") and len(recipe.description) > 20


def test_cp_copies_names_refuses_and_forces(tmp_path, capsys):
    dest = tmp_path / "my_repo" / "training"
    assert cli_main(["recipes", "cp", "dpo", str(dest)]) == 0
    out = capsys.readouterr().out
    for name in ("dpo.py", "dpo.yaml"):
        assert (dest / name).read_bytes() == (recipes_dir() / name).read_bytes()
        assert f"wrote {dest / name}" in out
    assert not (dest / "accelerate").exists()

    (dest / "dpo.yaml").write_text("# my edits\n")
    assert cli_main(["recipes", "cp", "dpo", str(dest), "--with-accelerate"]) == 2
    err = capsys.readouterr().err
    assert "perl-plugins: error:" in err and str(dest / "dpo.yaml") in err and "--force" in err
    assert (dest / "dpo.yaml").read_text() == "# my edits\n"  # nothing written on refusal
    assert not (dest / "accelerate").exists()

    assert cli_main(["recipes", "cp", "dpo", str(dest), "--with-accelerate", "--force"]) == 0
    assert (dest / "dpo.yaml").read_bytes() == (recipes_dir() / "dpo.yaml").read_bytes()
    shipped = sorted(p.name for p in (recipes_dir() / "accelerate").glob("*.yaml"))
    assert shipped and sorted(p.name for p in (dest / "accelerate").iterdir()) == shipped


def test_cp_unknown_recipe_names_the_choices(tmp_path, capsys):
    assert cli_main(["recipes", "cp", "ppo", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "'ppo'" in err and "dpo" in err and not any(tmp_path.iterdir())


@pytest.mark.parametrize("name", RECIPES)
def test_recipes_import_only_perl_plugins_never_each_other(name):
    tree = ast.parse((recipes_dir() / f"{name}.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    ours = {module for module in imported if module.split(".")[0] in {"perl_plugins", "recipes", *RECIPES}}
    assert not {m for m in ours if m.split(".")[0] != "perl_plugins" or m.startswith("perl_plugins.recipes")}


def test_copied_pretrain_base_runs_alone(tmp_path):
    from test_pretrained_base import TINY_RUN

    assert cli_main(["recipes", "cp", "pretrain_base", str(tmp_path / "repo")]) == 0
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [
            sys.executable,
            "-I",
            "pretrain_base.py",
            "--config",
            "pretrain_base.yaml",
            "--output_dir",
            str(out),
            *TINY_RUN,
        ],
        cwd=tmp_path / "repo",
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    card = json.loads((out / "card.json").read_text())
    assert (out / "model.safetensors").is_file() and card["files"]["model.safetensors"]
