"""The registry: built-in plugins come from code (a source checkout that was never pip-installed has
them), entry points add third-party plugins, and no plugin is listed twice."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import perl_plugins
from perl_plugins.host.registry import BUILTIN, installed_plugins

PACKAGE = Path(perl_plugins.__file__).resolve().parent


def fake_dist(site: Path, name: str, entry_points: dict[str, str]) -> None:
    """An installed distribution ``name`` (its dist-info only) declaring ``perl_plugins`` entry points."""
    dist_info = site / f"{name.replace('-', '_')}-0.1.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    lines = "".join(f"{key} = {value}\n" for key, value in entry_points.items())
    (dist_info / "entry_points.txt").write_text(f"[perl_plugins]\n{lines}")


def test_builtin_lists_every_plugin_module_of_the_package():
    assert [name for name, _ in BUILTIN] == ["lora", "grm", "fp8", "adapter_ckpt", "rrhf"]
    modules = {p.stem for p in (PACKAGE / "plugins").iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()}
    assert modules - {"__init__"} == {name for name, _ in BUILTIN}
    assert all(target == f"perl_plugins.plugins.{name}" for name, target in BUILTIN)


def test_an_install_that_still_declares_the_builtins_lists_each_once(tmp_path, monkeypatch):
    """perl-plugins wheels before the BUILTIN tuple declared the built-ins as entry points."""
    fake_dist(tmp_path, "perl-plugins", {name: target for name, target in BUILTIN})
    monkeypatch.syspath_prepend(str(tmp_path))
    found = installed_plugins()
    assert sorted(found) == sorted(name for name, _ in BUILTIN)
    assert {spec.source for spec in found.values()} == {"builtin"}


def test_a_third_party_plugin_cannot_take_a_builtin_name(tmp_path, monkeypatch):
    fake_dist(tmp_path, "lookalike", {"lora": "lookalike_impl", "extra": "extra_impl"})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(
        UserWarning, match=r"entry point 'lora' of lookalike .*taken by 'perl_plugins.plugins.lora' \(builtin\)"
    ):
        found = installed_plugins()
    assert found["lora"].source == "builtin" and found["lora"].target == "perl_plugins.plugins.lora"
    assert found["extra"].source == "entry point (lookalike)"


def isolated_checkout(tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the package as a source checkout has it, and a site-packages that holds this venv's
    dependencies but neither perl-plugins' dist-info (so no entry points) nor its editable finder."""
    checkout, site = tmp_path / "checkout", tmp_path / "site"
    shutil.copytree(PACKAGE, checkout / "perl_plugins", ignore=shutil.ignore_patterns("__pycache__"))
    site.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if "perl_plugins" not in entry.name and "perl-plugins" not in entry.name:
            (site / entry.name).symlink_to(entry)
    return checkout, site


def run_isolated(checkout: Path, site: Path, code: str) -> subprocess.CompletedProcess:
    # -I: no PYTHON* variables, no user site, no script dir; -S: no site module, so no .pth file runs
    # (the editable install's finder is one). sys.path is then only the stdlib, the checkout and the copy.
    prelude = f"import sys; sys.path[:0] = [{str(checkout)!r}, {str(site)!r}]\n"
    return subprocess.run(
        [sys.executable, "-I", "-S", "-c", prelude + code],
        check=False,
        capture_output=True,
        text=True,
        cwd=checkout,
        timeout=300,
    )


def test_a_source_checkout_that_was_never_installed_lists_the_builtins(tmp_path):
    checkout, site = isolated_checkout(tmp_path)
    probe = run_isolated(
        checkout,
        site,
        "import importlib.metadata as md, json, perl_plugins\n"
        "try:\n    md.distribution('perl-plugins'); installed = True\n"
        "except md.PackageNotFoundError:\n    installed = False\n"
        "print(json.dumps({'installed': installed, 'file': perl_plugins.__file__,"
        " 'entry_points': [ep.name for ep in md.entry_points(group='perl_plugins')]}))",
    )
    assert probe.returncode == 0, probe.stderr
    facts = json.loads(probe.stdout)
    assert facts["installed"] is False and facts["entry_points"] == []  # the isolation holds
    assert facts["file"].startswith(str(checkout))

    listing = run_isolated(
        checkout,
        site,
        "import runpy; sys.argv = ['perl-plugins', 'plugins']\nrunpy.run_module('perl_plugins.cli', run_name='__main__')",
    )
    assert listing.returncode == 0, listing.stderr
    for name, _ in BUILTIN:
        assert f"{name}  [builtin]" in listing.stdout.splitlines()
    assert "unavailable" not in listing.stdout
