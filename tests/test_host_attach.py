"""Finding and attaching plugins: entry points, local files, environment lists, hook order,
model preparation, optimizer/checkpoint hooks, and ``PluginArguments`` on the stock parsers."""

from __future__ import annotations

import copy
import sys
import textwrap

import pytest
import torch
from conftest import length_reward, tiny_lm, tiny_reward_model, train_quietly
from transformers import TrainerCallback

from perl_plugins import PluginError, attach, hookimpl, keep_columns
from perl_plugins.host.arguments import make_plugin_arguments
from perl_plugins.host.plugin_set import PluginSet
from perl_plugins.host.registry import installed_plugins, load

BUILTINS = ("adapter_ckpt", "fp8", "grm", "lora", "rrhf")


@pytest.fixture
def trainer(make_trainer):
    return make_trainer("trainer", max_steps=1)


# ---------------------------------------------------------------- discovery


@pytest.fixture
def fake_distribution(tmp_path, monkeypatch):
    """An installed distribution ``fakeplug`` declaring a ``perl_plugins`` entry point."""
    site = tmp_path / "site"
    dist_info = site / "fakeplug-0.1.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakeplug\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text("[perl_plugins]\nfakeplug = fakeplug_impl\n")
    (site / "fakeplug_impl.py").write_text(
        textwrap.dedent(
            '''
            """A third-party plugin with one option."""
            from dataclasses import dataclass, field

            from perl_plugins import hookimpl


            @dataclass
            class FakeplugOptions:
                fakeplug_level: int = field(default=3, metadata={"help": "A level."})


            @hookimpl
            def perl_plugin_options():
                return FakeplugOptions


            @hookimpl
            def perl_configure(trainer, options):
                trainer.fakeplug_level = options["fakeplug"].fakeplug_level
            '''
        )
    )
    monkeypatch.syspath_prepend(str(site))
    yield site
    sys.modules.pop("fakeplug_impl", None)


def test_builtins_are_listed_from_code():
    found = installed_plugins()
    for name in BUILTINS:
        assert found[name].source == "builtin"
        assert found[name].target == f"perl_plugins.plugins.{name}"


def test_entry_point_discovery_and_attach(fake_distribution, trainer):
    spec = installed_plugins()["fakeplug"]
    assert spec.source == "entry point (fakeplug)" and spec.target == "fakeplug_impl"

    attach(trainer, plugins="fakeplug", fakeplug_level=7)
    assert trainer.perl_plugins.names == ["fakeplug"]
    assert trainer.fakeplug_level == 7
    assert trainer.perl_plugins.plugin_set.plugins[0].source == "entry point (fakeplug)"


def test_entry_point_options_become_flags(fake_distribution):
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser([make_plugin_arguments()]).parse_args_into_dataclasses(
        ["--plugins", "fakeplug", "--fakeplug_level", "5"]
    )
    assert args.attach_kwargs() == (["fakeplug"], {"fakeplug_level": 5})


def test_local_file_by_relative_path(tmp_path, monkeypatch, make_trainer):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "my_plugin.py").write_text(
        "from perl_plugins import hookimpl\n\n\n"
        "@hookimpl\ndef perl_configure(trainer):\n    trainer.my_plugin_seen = True\n"
    )
    monkeypatch.chdir(tmp_path)
    loaded = load("./hooks/my_plugin.py")
    assert loaded.name == "my_plugin"
    assert loaded.source == f"file ({(hooks / 'my_plugin.py').resolve()})"

    first, second = make_trainer("trainer", max_steps=1), make_trainer("trainer", max_steps=1)
    attach(first, plugins="./hooks/my_plugin.py")
    attach(second, plugins=[str(hooks / "my_plugin.py")])  # same file, absolute path: same module
    assert first.my_plugin_seen and second.my_plugin_seen
    assert first.perl_plugins.plugin_set.plugins[0].module is second.perl_plugins.plugin_set.plugins[0].module


def test_plugin_module_object(trainer):
    import types

    module = types.ModuleType("pkg.inline_plugin")
    module.perl_configure = hookimpl(lambda trainer: setattr(trainer, "inline_seen", True))
    attach(trainer, plugins=[module])
    assert trainer.perl_plugins.names == ["inline_plugin"] and trainer.inline_seen


# ---------------------------------------------------------------- environment lists


def test_default_list_from_environment(monkeypatch, trainer, plugin_file):
    monkeypatch.setenv("PERL_PLUGINS", f"{plugin_file('observer')}, {plugin_file('options_only')}")
    attach(trainer)
    assert trainer.perl_plugins.names == ["observer", "options_only"]


def test_explicit_list_overrides_default(monkeypatch, trainer, plugin_file):
    monkeypatch.setenv("PERL_PLUGINS", plugin_file("observer"))
    attach(trainer, plugins=[plugin_file("options_only")])
    assert trainer.perl_plugins.names == ["options_only"]


def test_disable_list(monkeypatch, make_trainer, plugin_file):
    monkeypatch.setenv("PERL_PLUGINS", plugin_file("observer"))
    monkeypatch.setenv("PERL_PLUGINS_DISABLE", "observer,gmr")
    trainer = make_trainer("trainer", max_steps=1)
    assert attach(trainer) is trainer and not hasattr(trainer, "perl_plugins")  # default list emptied

    trainer = make_trainer("trainer", max_steps=1)
    attach(trainer, plugins=[plugin_file("observer"), plugin_file("options_only"), "gmr"])
    assert trainer.perl_plugins.names == ["options_only"]  # disabled names are dropped, even unknown ones


# ---------------------------------------------------------------- hook order and model preparation


class Tag:
    """A plugin object named ``name`` that records the order hooks reach it."""

    def __init__(self, name: str, first_result=None) -> None:
        self.PLUGIN_NAME = name
        self.first_result = first_result

    @hookimpl
    def perl_on_step_end(self, state):
        state.append(self.PLUGIN_NAME)

    @hookimpl
    def perl_shape_rewards(self, rewards):
        return rewards + [self.PLUGIN_NAME]

    @hookimpl
    def perl_create_optimizer(self):
        return self.first_result


def test_hooks_run_in_plugin_order():
    plugins = PluginSet.from_names([Tag("a"), Tag("b", first_result="from b"), Tag("c", first_result="from c")])
    calls = []
    plugins.call("perl_on_step_end", trainer=None, state=calls, control=None)
    assert calls == ["a", "b", "c"]
    chained = plugins.chain("perl_shape_rewards", "rewards", [], trainer=None, prompts=[], completions=[])
    assert chained == ["a", "b", "c"]
    assert plugins.call("perl_create_optimizer", trainer=None, model=None) == "from b"  # first non-None result


class RecordRoles:
    PLUGIN_NAME = "record_roles"

    def __init__(self) -> None:
        self.roles = []

    @hookimpl
    def perl_prepare_model(self, model, role):
        self.roles.append((role, model))


def test_prepare_model_roles(make_trainer, tokenizer, datasets_by_kind, tmp_path):
    import trl

    recorder = RecordRoles()
    dpo = make_trainer("dpo", max_steps=1)
    attach(dpo, plugins=[recorder])
    assert recorder.roles == [("policy", dpo.model), ("reference", dpo.ref_model)]

    reward_model = tiny_reward_model(tokenizer)
    grpo = trl.GRPOTrainer(
        model=tiny_lm(tokenizer),
        reward_funcs=[length_reward, reward_model],
        reward_processing_classes=[None, tokenizer],
        args=trl.GRPOConfig(
            output_dir=str(tmp_path),
            use_cpu=True,
            report_to="none",
            num_generations=2,
            per_device_train_batch_size=2,
            max_completion_length=8,
        ),
        train_dataset=datasets_by_kind["prompt"],
        processing_class=tokenizer,
    )
    recorder = RecordRoles()
    attach(grpo, plugins=[recorder])
    assert [role for role, _ in recorder.roles] == ["policy", "reward"]
    assert recorder.roles[1][1] is grpo.reward_funcs[1]


def test_prepare_model_results_chain(trainer):
    class Replace:
        PLUGIN_NAME = "replace"

        @hookimpl
        def perl_prepare_model(self, model):
            return copy.deepcopy(model)

    recorder = RecordRoles()
    original = trainer.model
    attach(trainer, plugins=[Replace(), recorder])
    ((role, seen),) = recorder.roles
    assert role == "policy" and seen is not original and seen is trainer.model is trainer.model_wrapped
    assert len(train_quietly(trainer)) == 1


# ---------------------------------------------------------------- optimizer and checkpoint hooks


def test_plugin_optimizer_and_own_checkpoints(make_trainer, plugin_file, tmp_path):
    trainer = make_trainer("trainer", max_steps=2, save_strategy="steps", save_steps=2, output_dir=tmp_path)
    attach(trainer, plugins=plugin_file("trainer_io"), trainer_io_lr=0.05)
    train_quietly(trainer)
    optimizer = trainer.optimizer.optimizer  # unwrapped from accelerate's AcceleratedOptimizer
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["lr"] == 0.05
    assert trainer.trainer_io_calls == ["create_optimizer", ("save", "checkpoint-2")]
    assert sorted(p.name for p in (tmp_path / "checkpoint-2").iterdir()) == ["trainer_io.txt"]  # stock save skipped


class _WeightsAtStart(TrainerCallback):
    """Keeps a copy of the weights as training starts (after a resumed checkpoint was loaded)."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stock_checkpoints_and_plugin_loading(make_trainer, plugin_file, tmp_path):
    saver = make_trainer("trainer", max_steps=2, save_strategy="steps", save_steps=2, output_dir=tmp_path)
    attach(saver, plugins=plugin_file("trainer_io"), trainer_io_own_checkpoints=False)
    train_quietly(saver)
    checkpoint = tmp_path / "checkpoint-2"
    assert (checkpoint / "trainer_state.json").is_file() and ("save", "checkpoint-2") in saver.trainer_io_calls
    trained = {k: v.detach().clone() for k, v in saver.model.state_dict().items()}

    for own in (True, False):
        resumed = make_trainer("trainer", max_steps=3, output_dir=tmp_path / f"resume-{own}")
        initial = {k: v.detach().clone() for k, v in resumed.model.state_dict().items()}
        attach(resumed, plugins=plugin_file("trainer_io"), trainer_io_own_checkpoints=own)
        probe = _WeightsAtStart()
        resumed.add_callback(probe)
        resumed.train(resume_from_checkpoint=str(checkpoint))
        assert ("load", "checkpoint-2") in resumed.trainer_io_calls
        assert resumed.state.global_step == 3
        # True: the plugin restored the model, so the stock loader did not; None: the stock loader ran.
        assert _same_weights(probe.weights, initial if own else trained)
        assert not _same_weights(initial, trained)


class BestModel:
    """Answers ``perl_load_best_model``; it zeroes the weights, so whether the stock loader ran after
    it shows in the final weights."""

    PLUGIN_NAME = "best_model"

    def __init__(self, handled) -> None:
        self.handled = handled
        self.calls = []

    @hookimpl
    def perl_load_best_model(self, trainer, model, checkpoint_dir):
        self.calls.append((checkpoint_dir, model))
        with torch.no_grad():
            for param in model.parameters():
                param.zero_()
        return self.handled


def test_plugin_loads_the_best_model(make_trainer, tmp_path):
    from transformers import Trainer, TrainingArguments

    for handled in (True, None):
        data = make_trainer("trainer", max_steps=2)
        args = TrainingArguments(
            output_dir=str(tmp_path / f"best-{handled}"),
            max_steps=2,
            per_device_train_batch_size=2,
            eval_strategy="steps",
            eval_steps=1,
            save_strategy="steps",
            save_steps=1,
            load_best_model_at_end=True,
            use_cpu=True,
            report_to="none",
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=data.model,
            args=args,
            train_dataset=data.train_dataset,
            eval_dataset=data.train_dataset.select(range(4)),
            data_collator=data.data_collator,
        )
        plugin = BestModel(handled)
        attach(trainer, plugins=[plugin])
        train_quietly(trainer)
        assert plugin.calls == [(trainer.state.best_model_checkpoint, trainer.model)]
        zeroed = all(not p.any() for p in trainer.model.parameters())
        assert zeroed == bool(handled)  # True: the stock loader was skipped; None: it loaded the best weights

    untouched = attach(make_trainer("trainer", max_steps=1), plugins=[RecordRoles()])
    assert "_load_best_model" not in vars(untouched)  # wrapped only for a plugin implementing the hook


class RowIds:
    """Feeds a dataset column of its own to its loss term through ``keep_columns``."""

    PLUGIN_NAME = "row_ids"

    def __init__(self) -> None:
        self.seen = []

    @hookimpl
    def perl_configure(self, trainer):
        trainer.train_dataset = trainer.train_dataset.add_column("row_id", list(range(len(trainer.train_dataset))))
        inner = trainer.data_collator

        def collate(examples):
            batch = inner([{k: v for k, v in e.items() if k != "row_id"} for e in examples])
            batch["row_ids"] = torch.tensor([e["row_id"] for e in examples])
            return batch

        keep_columns(trainer, ["row_id"], collator=collate, private=["row_ids"])

    @hookimpl
    def perl_compute_loss(self, inputs):
        self.seen.append(inputs["row_ids"].tolist())


def test_keep_columns_feeds_a_plugins_columns_past_the_stock_loss(make_trainer):
    trainer = make_trainer("trainer", max_steps=2)
    stock, stock_keys = trainer.compute_loss, []

    def spy(model, inputs, *args, **kwargs):
        stock_keys.append(set(inputs))
        return stock(model, inputs, *args, **kwargs)

    trainer.compute_loss = spy  # what attach wraps: the stock loss as the trainer has it
    plugin = RowIds()
    attach(trainer, plugins=[plugin])
    train_quietly(trainer)
    # remove_unused_columns kept row_id (the collator read it); the stock loss never saw row_ids
    assert len(plugin.seen) == 2 and all(len(ids) == 2 for ids in plugin.seen)
    assert all(0 <= i < len(trainer.train_dataset) for ids in plugin.seen for i in ids)
    assert len(stock_keys) == 2 and all("row_ids" not in keys and "input_ids" in keys for keys in stock_keys)


# ---------------------------------------------------------------- PluginArguments


def test_plugin_arguments_with_hf_argument_parser(plugin_file, make_trainer):
    from transformers import HfArgumentParser

    path = plugin_file("aux_loss")
    arguments_cls = make_plugin_arguments(path)
    (args,) = HfArgumentParser([arguments_cls]).parse_args_into_dataclasses(
        ["--plugins", path, "--aux_loss_weight", "0.25"]
    )
    plugins, options = args.attach_kwargs()
    assert (plugins, options) == ([path], {"aux_loss_weight": 0.25})
    trainer = attach(make_trainer("trainer", max_steps=1), plugins, **options)
    assert trainer.perl_plugins.options["aux_loss"].aux_loss_weight == 0.25


def test_plugin_arguments_default_from_environment(plugin_file, monkeypatch):
    from transformers import HfArgumentParser

    path = plugin_file("options_only")
    monkeypatch.setenv("PERL_PLUGINS", path)
    (args,) = HfArgumentParser([make_plugin_arguments(path)]).parse_args_into_dataclasses(["--options_only_level", "4"])
    assert args.plugins is None
    assert args.attach_kwargs() == ([path], {"options_only_level": 4, "options_only_tag": "x"})


def test_plugin_arguments_lists_builtin_options():
    import dataclasses

    from trl import ModelConfig

    import perl_plugins

    # Options trl's ModelConfig already declares (--lora_r...) are left to it, so both fit in one parser.
    fields = set(perl_plugins.PluginArguments.__dataclass_fields__) | {f.name for f in dataclasses.fields(ModelConfig)}
    assert "plugins" in fields
    for name, spec in installed_plugins().items():
        try:
            option_cls = PluginSet.from_names([name]).option_classes[name]
        except PluginError:  # a built-in that fails to load: its options are skipped with a warning
            continue
        if option_cls is not None:
            assert set(option_cls.__dataclass_fields__) <= fields, spec


@pytest.mark.parametrize("cli_override", [False, True])
def test_plugin_arguments_with_trl_parser_and_yaml(plugin_file, tmp_path, cli_override):
    import trl

    path = plugin_file("aux_loss")
    config = tmp_path / "run.yaml"
    config.write_text(
        f"output_dir: {tmp_path / 'out'}\nuse_cpu: true\nreport_to: none\nplugins: {path}\naux_loss_weight: 0.125\n"
    )
    argv = ["--config", str(config)] + (["--aux_loss_weight", "0.75"] if cli_override else [])
    training_args, args = trl.TrlParser((trl.SFTConfig, make_plugin_arguments(path))).parse_args_and_config(argv)
    assert training_args.output_dir == str(tmp_path / "out")
    assert args.attach_kwargs() == ([path], {"aux_loss_weight": 0.75 if cli_override else 0.125})


@pytest.mark.parametrize("kind", ["trainer", "sft", "dpo", "reward"])
def test_added_terms_follow_gradient_accumulation(kind, make_trainer, plugin_file):
    """An added per-micro-batch term counts once per optimizer step, with or without accumulation:
    whether the trainer divides the total by the accumulation steps (dpo, reward) or its stock loss
    is already normalized over the window (num_items_in_batch: trainer, sft). With plain SGD and no
    clipping the update is linear in the gradient, so the weights a term moves in one step (with
    minus without it) are the same for 1 micro-batch of 4 rows and 2 accumulated ones of 2 (the
    aux term depends on the weights only)."""

    def weights(batch_size: int, accumulation: int, weight: float) -> dict[str, torch.Tensor]:
        trainer = make_trainer(
            kind,
            max_steps=1,
            per_device_train_batch_size=batch_size,
            max_grad_norm=0.0,
            gradient_accumulation_steps=accumulation,
            optim="sgd",
            learning_rate=0.5,
        )
        attach(trainer, plugins=[plugin_file("aux_loss")], aux_loss_weight=weight)
        train_quietly(trainer)
        return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    def moved_by_term(batch_size: int, accumulation: int) -> dict[str, torch.Tensor]:
        with_term, without = weights(batch_size, accumulation, 50.0), weights(batch_size, accumulation, 0.0)
        return {n: with_term[n] - without[n] for n in with_term}

    whole, accumulated = moved_by_term(4, 1), moved_by_term(2, 2)
    assert max(d.abs().max() for d in whole.values()) > 1e-4  # the term does move the weights
    for name, delta in whole.items():
        torch.testing.assert_close(accumulated[name], delta, rtol=1e-3, atol=1e-7, msg=name)


def test_loss_terms_total_is_the_weighted_sum_with_added_terms_scaled():
    from perl_plugins.host.loss_terms import LossTerms

    base, extra, other = torch.tensor(2.0), torch.tensor(3.0), torch.tensor(5.0)
    terms = LossTerms("dpo_loss", base)
    assert terms.total() is base  # alone at weight 1: the stock tensor itself
    terms.add("extra", extra, 0.5)
    terms.add("other", other)
    terms.reweight("dpo_loss", 0.9)
    assert terms.weight("dpo_loss") == 0.9 and terms.weight("extra") == 0.5
    assert terms.total().item() == pytest.approx(0.9 * 2 + 0.5 * 3 + 5)
    assert terms.total(added_scale=0.25).item() == pytest.approx(0.9 * 2 + 0.25 * (0.5 * 3 + 5))
    assert terms.detached() == {"dpo_loss": 2.0, "extra": 3.0, "other": 5.0}
    with pytest.raises(KeyError, match="already added"):
        terms.add("extra", extra)
