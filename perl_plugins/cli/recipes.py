"""``perl-plugins recipes``: list the recipes shipped in ``perl_plugins.recipes``, and
``perl-plugins recipes cp NAME DEST`` to copy one (its ``.py`` and ``.yaml``; with
``--with-accelerate`` the launch configs too) into the user's repo, as torchtune's ``tune cp`` does.
A copied recipe runs from its new place: recipes import only ``perl_plugins``, never each other."""

from __future__ import annotations

import argparse
import ast
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

ACCELERATE_DIR = "accelerate"


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str  # the first line of the recipe's docstring
    script: Path
    config: Path | None


def recipes_dir() -> Path:
    return Path(str(files("perl_plugins.recipes")))


def find_recipes() -> dict[str, Recipe]:
    """Every recipe: a ``NAME.py`` with a ``main`` next to its ``NAME.yaml``, read without importing it."""
    found = {}
    for script in sorted(recipes_dir().glob("*.py")):
        if script.name.startswith("_"):
            continue
        tree = ast.parse(script.read_text())
        if not any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in tree.body):
            continue
        doc = (ast.get_docstring(tree) or "").strip()
        config = script.with_suffix(".yaml")
        found[script.stem] = Recipe(script.stem, _first_sentence(doc), script, config if config.is_file() else None)
    return found


def _first_sentence(doc: str) -> str:
    paragraph = " ".join(doc.split("\n\n")[0].split()).replace("``", "")
    end = re.search(r"(?<!\bal)(?<!\be\.g)\.(\s|$)", paragraph)  # "et al." and "e.g." end no sentence
    return paragraph if end is None else paragraph[: end.start() + 1]


def _print_list(recipes: dict[str, Recipe]) -> None:
    width = max(len(name) for name in recipes)
    for recipe in recipes.values():
        print(f"{recipe.name:<{width}}  {recipe.description}")
        if recipe.config is not None:
            print(f"{'':<{width}}  default config: {recipe.config}")
    print("\ncopy one into your repo: perl-plugins recipes cp NAME DEST [--with-accelerate] [--force]")


def copy_recipe(name: str, dest: str | Path, *, with_accelerate: bool = False, force: bool = False) -> list[Path]:
    """Copy recipe ``name`` into directory ``dest`` (created if missing); returns the written paths.
    Refuses, writing nothing, when a target exists and ``force`` is false."""
    recipes = find_recipes()
    if name not in recipes:
        raise ValueError(f"no recipe {name!r}; the recipes are: {', '.join(recipes)}")
    recipe = recipes[name]
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise ValueError(f"{dest} exists and is not a directory: DEST is the directory to copy into")
    pairs = [(recipe.script, dest / recipe.script.name)]
    if recipe.config is not None:
        pairs.append((recipe.config, dest / recipe.config.name))
    if with_accelerate:
        pairs += [
            (config, dest / ACCELERATE_DIR / config.name)
            for config in sorted((recipes_dir() / ACCELERATE_DIR).glob("*.yaml"))
        ]
    existing = [target for _, target in pairs if target.exists()]
    if existing and not force:
        raise FileExistsError(
            f"{', '.join(map(str, existing))} already exist{'s' if len(existing) == 1 else ''}; "
            "nothing was copied (--force overwrites)"
        )
    for source, target in pairs:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return [target for _, target in pairs]


def main(argv: Sequence[str]) -> int:
    argv = list(argv)
    if argv[:1] != ["cp"]:
        parser = argparse.ArgumentParser(
            prog="perl-plugins recipes", description="List the recipes (name, what it does, default YAML)."
        )
        parser.parse_args(argv)
        _print_list(find_recipes())
        return 0
    parser = argparse.ArgumentParser(
        prog="perl-plugins recipes cp",
        description="Copy a recipe and its YAML into your repo (like `tune cp`); it runs there as is.",
    )
    parser.add_argument("name", help="recipe name (see `perl-plugins recipes`)")
    parser.add_argument("dest", help="directory to copy into (created if missing)")
    parser.add_argument(
        "--with-accelerate", action="store_true", help=f"also copy the launch configs into DEST/{ACCELERATE_DIR}/"
    )
    parser.add_argument("--force", action="store_true", help="overwrite files that exist")
    args = parser.parse_args(argv[1:])
    try:
        written = copy_recipe(args.name, args.dest, with_accelerate=args.with_accelerate, force=args.force)
    except (ValueError, OSError) as exc:
        print(f"perl-plugins: error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    script = next(path for path in written if path.suffix == ".py")
    config = next((path for path in written if path.suffix == ".yaml" and path.parent == script.parent), None)
    print(f"run it: python {script}" + (f" --config {config}" if config else ""))
    return 0
