"""Recipes refuse plugin options that none of their stages enables (issue #14, item 3), as the CLI
and ``attach()`` do, before anything loads."""

from __future__ import annotations

import importlib

import pytest

from perl_plugins.errors import PluginOptionError
from perl_plugins.host.arguments import check_options, options_for, parse_plugin_options


def test_options_of_an_enabled_stage_pass_and_reach_only_that_stage():
    options = {"grm_alpha": 0.05, "lora_dropout": 0.0}
    check_options(options, "lora,grm", "lora")
    assert options_for("lora", options) == {"lora_dropout": 0.0}
    assert options_for("lora,grm", options) == options


def test_an_option_of_a_plugin_no_stage_enables_names_its_plugin():
    with pytest.raises(PluginOptionError, match=r"'grm_alpha' is an option of plugin 'grm', which no stage"):
        check_options('{"grm_alpha": 0.05}', "lora", "lora")


def test_an_option_of_no_plugin_is_refused():
    with pytest.raises(PluginOptionError, match=r"'grm_alpah' is not an option of any plugin"):
        check_options({"grm_alpah": 0.05}, "lora,grm")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("{grm_alpha: 0.05}", r"plugin_options '\{grm_alpha: 0.05\}' is not valid JSON"),
        ("[1, 2]", r"got list \[1, 2\]"),
    ],
)
def test_plugin_options_that_are_no_mapping_are_refused_naming_the_value(options, message):
    for parse in (lambda: check_options(options, "lora"), lambda: options_for("lora", options)):
        with pytest.raises(PluginOptionError, match=message):
            parse()


def test_plugin_options_from_yaml_or_the_command_line_read_alike():
    assert parse_plugin_options('{"lora_r": 8}') == parse_plugin_options({"lora_r": 8}) == {"lora_r": 8}
    assert parse_plugin_options("") == parse_plugin_options(None) == {}


@pytest.mark.parametrize("recipe", ["dpo", "raft", "rrhf", "rlaif"])
def test_recipes_refuse_before_loading_anything(recipe, tmp_path, monkeypatch):
    module = importlib.import_module(f"perl_plugins.recipes.{recipe}")
    loaded = []
    monkeypatch.setattr(module, "load_base", lambda *a, **k: loaded.append(a) or ("unused", None))
    argv = ["--output_dir", str(tmp_path / "out"), "--plugin_options", '{"fp8_comm": true}']
    with pytest.raises(PluginOptionError, match="'fp8_comm' is an option of plugin 'fp8'"):
        module.main(argv)
    assert not loaded and not (tmp_path / "out").exists()
