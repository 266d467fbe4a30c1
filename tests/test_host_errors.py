"""Every way attaching can fail: each raises a PluginError naming the culprit, before the trainer changes."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import pytest
from conftest import train_quietly

from perl_plugins import (
    PluginError,
    PluginIncompatibleError,
    PluginLoadError,
    PluginOptionError,
    UnknownPluginError,
    attach,
    hookimpl,
)
from perl_plugins.host.registry import installed_plugins


@pytest.fixture
def trainer(make_trainer):
    return make_trainer("trainer", max_steps=1)


def assert_untouched(trainer, before: dict, callbacks: list) -> None:
    """Same attributes holding the same objects, stock methods, no extra callback."""
    assert not hasattr(trainer, "perl_plugins")
    assert vars(trainer).keys() == before.keys()
    assert all(vars(trainer)[key] is value for key, value in before.items())
    assert trainer.compute_loss.__func__ is type(trainer).compute_loss
    assert trainer.callback_handler.callbacks == callbacks


def snapshot(trainer) -> tuple[dict, list]:
    return dict(vars(trainer)), list(trainer.callback_handler.callbacks)


def test_errors_are_value_errors():
    for cls in (UnknownPluginError, PluginLoadError, PluginIncompatibleError, PluginOptionError):
        assert issubclass(cls, PluginError) and issubclass(cls, ValueError)


def test_unknown_plugin_lists_available_and_suggests_closest(trainer):
    before = snapshot(trainer)
    with pytest.raises(UnknownPluginError) as info:
        attach(trainer, plugins="gmr")
    message = str(info.value)
    assert "Unknown plugin 'gmr'" in message and "Did you mean 'grm'?" in message
    for name in installed_plugins():
        assert name in message
    assert "local plugin file" in message
    assert_untouched(trainer, *before)


def test_unknown_plugin_without_close_match_has_no_suggestion(trainer):
    with pytest.raises(UnknownPluginError) as info:
        attach(trainer, plugins="zzzzzz")
    assert "Did you mean" not in str(info.value)


def test_missing_local_file(trainer, tmp_path):
    missing = tmp_path / "nope.py"
    with pytest.raises(UnknownPluginError, match="does not exist") as info:
        attach(trainer, plugins=str(missing))
    assert str(missing) in str(info.value)


def test_incompatible_trainer_refused_before_anything_changes(trainer, plugin_file):
    before = snapshot(trainer)
    with pytest.raises(PluginIncompatibleError, match="refuses: needs a DPOTrainer, got Trainer"):
        attach(trainer, plugins=plugin_file("refuses"))
    assert_untouched(trainer, *before)
    assert trainer.state.global_step == 0
    # Still a working stock trainer (the refused plugin's loss hook would raise if it ran).
    assert len(train_quietly(trainer)) == 1


def test_check_passes_on_a_supported_trainer(make_trainer, plugin_file):
    dpo = make_trainer("dpo", max_steps=1)
    attach(dpo, plugins=plugin_file("refuses"))
    assert dpo.perl_plugins.names == ["refuses"]


def test_local_file_failing_to_import(trainer, plugin_file):
    path = plugin_file("broken_import")
    before = snapshot(trainer)
    for _ in range(2):  # a failed import leaves nothing cached: the second attempt fails the same way
        with pytest.raises(PluginLoadError) as info:
            attach(trainer, plugins=path)
        assert path in str(info.value)
        assert "RuntimeError" in str(info.value) and "boom while importing broken_import" in str(info.value)
        assert isinstance(info.value.__cause__, RuntimeError)
    assert not [name for name in sys.modules if name.startswith("perl_plugins_local_broken_import")]
    assert_untouched(trainer, *before)


@pytest.mark.parametrize("stage", ["configure", "prepare_model"])
def test_failure_midway_restores_the_trainer(trainer, plugin_file, stage):
    before = snapshot(trainer)
    model, args, learning_rate = trainer.model, trainer.args, trainer.args.learning_rate
    with pytest.raises(RuntimeError, match=f"failing in perl_{stage}"):
        attach(trainer, plugins=plugin_file("fails_midway"), fails_midway_stage=stage)
    assert_untouched(trainer, *before)
    assert trainer.args is args and trainer.args.learning_rate == learning_rate
    assert trainer.model is model and not hasattr(trainer, "fails_midway_configured")
    assert len(train_quietly(trainer)) == 1


def test_wrapping_failure_restores_the_trainer(trainer, plugin_file):
    # Reward shaping needs an RL trainer: refused while wrapping, after perl_configure ran.
    before = snapshot(trainer)
    with pytest.raises(PluginIncompatibleError, match="computes no rewards"):
        attach(trainer, plugins=[plugin_file("aux_loss"), plugin_file("reward_shift")])
    assert_untouched(trainer, *before)
    assert not hasattr(trainer, "aux_loss_events")


def test_unknown_option(trainer, plugin_file):
    before = snapshot(trainer)
    with pytest.raises(PluginOptionError) as info:
        attach(trainer, plugins=plugin_file("aux_loss"), aux_loss_wieght=1.0)
    assert "aux_loss_wieght" in str(info.value) and "aux_loss_weight" in str(info.value)
    # An option of a plugin that is not enabled is just as unknown.
    with pytest.raises(PluginOptionError, match="aux_loss_weight"):
        attach(trainer, plugins=plugin_file("observer"), aux_loss_weight=1.0)
    assert_untouched(trainer, *before)


@pytest.mark.parametrize(
    ("stem", "options", "expected"),
    [
        ("aux_loss", {"aux_loss_weight": -1.0}, "aux_loss_weight must be >= 0"),
        ("fails_midway", {"fails_midway_stage": "bogus"}, "fails_midway_stage must be one of"),
    ],
)
def test_option_validation_names_the_plugin(trainer, plugin_file, stem, options, expected):
    before = snapshot(trainer)
    with pytest.raises(PluginOptionError) as info:
        attach(trainer, plugins=plugin_file(stem), **options)
    assert f"Plugin {stem!r}" in str(info.value) and expected in str(info.value)
    assert_untouched(trainer, *before)


def test_misspelled_hook_name(trainer, plugin_file):
    with pytest.raises(PluginLoadError, match="perl_on_step_ends") as info:
        attach(trainer, plugins=plugin_file("misspelled_hook"))
    assert "misspelled_hook" in str(info.value)


def test_hook_with_unknown_argument(trainer):
    class BadArgs:
        PLUGIN_NAME = "bad_args"

        @hookimpl
        def perl_on_log(self, logs, not_an_argument):
            pass

    with pytest.raises(PluginLoadError, match="bad_args"):
        attach(trainer, plugins=[BadArgs()])


def test_attaching_twice(trainer, plugin_file):
    attach(trainer, plugins=plugin_file("observer"))
    wrapped = trainer.compute_loss
    with pytest.raises(PluginIncompatibleError, match="already attached"):
        attach(trainer, plugins=plugin_file("aux_loss"))
    assert trainer.compute_loss is wrapped and trainer.perl_plugins.names == ["observer"]


def test_plugin_given_twice(trainer, plugin_file):
    with pytest.raises(PluginLoadError, match="given twice"):
        attach(trainer, plugins=[plugin_file("observer"), plugin_file("observer")])


def test_not_a_trainer():
    with pytest.raises(PluginIncompatibleError, match="transformers.Trainer"):
        attach(object(), plugins=[])


def test_option_declared_by_two_plugins(trainer):
    @dataclass
    class Options:
        shared_value: int = 1

    class First:
        PLUGIN_NAME = "first"

        @hookimpl
        def perl_plugin_options(self):
            return Options

    class Second(First):
        PLUGIN_NAME = "second"

    with pytest.raises(PluginLoadError, match="shared_value"):
        attach(trainer, plugins=[First(), Second()])


def test_options_must_be_a_dataclass(trainer):
    class NotDataclass:
        PLUGIN_NAME = "not_dataclass"

        @hookimpl
        def perl_plugin_options(self):
            return dict

    with pytest.raises(PluginLoadError, match="not_dataclass.*dataclass"):
        attach(trainer, plugins=[NotDataclass()])


def test_processes_that_would_each_train_alone_are_refused(trainer, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # launched as 2 processes; the trainer (no use_cpu on CPU) sees 1
    with pytest.raises(PluginIncompatibleError, match="use_cpu=True"):
        attach(trainer, plugins="lora")
    assert not hasattr(trainer, "perl_plugins")
