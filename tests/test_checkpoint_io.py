"""Tests for perl_plugins.checkpoint.store / perl_plugins.models.fingerprint (the adapter_ckpt storage layer)."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from perl_plugins.checkpoint.store import (
    MANIFEST_NAME,
    SAVE_DELAY_ENV,
    BaseMismatchError,
    ChecksumMismatchError,
    IncompleteCheckpointError,
    MissingFileError,
    atomic_checkpoint_dir,
    base_fingerprint,
    is_complete,
    latest_complete_checkpoint,
    library_versions,
    load_rng_state,
    load_tensors,
    prune_checkpoints,
    rng_state_filename,
    save_rng_state,
    save_tensors,
    verify_checkpoint,
)
from perl_plugins.models import atomic
from perl_plugins.models.fingerprint import fingerprint_differences

REPO_ROOT = Path(__file__).resolve().parents[1]


TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
)


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides}))


def write_checkpoint(final: Path, metadata: dict | None = None, n_files: int = 3) -> Path:
    with atomic_checkpoint_dir(final, metadata) as tmp:
        for i in range(n_files):
            (tmp / f"file{i}.bin").write_bytes(bytes([i]) * (100 + i))
    return final


# --- fingerprint -----------------------------------------------------------------------------


def test_fingerprint_is_stable_and_json_serialisable():
    fp = base_fingerprint(tiny_llama())
    assert base_fingerprint(tiny_llama()) == fp  # same seed, fresh instance
    assert json.loads(json.dumps(fp)) == fp
    assert len(fp["id"]) == 16 and fp["num_tensors"] == 21
    assert fp["config"]["model_type"] == "llama" and "transformers_version" not in fp["config"]


def test_fingerprint_changes_with_one_weight():
    model = tiny_llama()
    before = base_fingerprint(model)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-3
    after = base_fingerprint(model)
    assert after["id"] != before["id"]
    assert fingerprint_differences(before, after) == ["weight values"]


def test_fingerprint_changes_with_shape_or_config():
    base = base_fingerprint(tiny_llama())
    wider = base_fingerprint(tiny_llama(intermediate_size=96))
    assert wider["id"] != base["id"]
    assert fingerprint_differences(base, wider) == ["config (intermediate_size)", "parameter names/shapes/dtypes"]
    # Same tensors, different architecture hyper-parameter: only the config can tell.
    eps = base_fingerprint(tiny_llama(rms_norm_eps=1e-5))
    assert eps["id"] != base["id"] and fingerprint_differences(base, eps) == ["config (rms_norm_eps)"]
    assert base_fingerprint(tiny_llama().to(torch.bfloat16))["id"] != base["id"]


def test_fingerprint_ignores_volatile_config_keys():
    model = tiny_llama()
    before = base_fingerprint(model)
    model.config.use_cache = False
    model.config.pad_token_id = 0
    model.config._name_or_path = "/somewhere/else"
    after = base_fingerprint(model)
    assert after["id"] == before["id"] and after["name"] == "/somewhere/else"


def test_fingerprint_same_with_and_without_peft_adapter():
    model = tiny_llama()
    plain = base_fingerprint(model)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():  # trained adapters must not matter either
        for _, param in peft_model.named_parameters():
            if param.requires_grad:
                param.add_(1.0)
    assert base_fingerprint(peft_model) == plain
    assert base_fingerprint(peft_model.get_base_model()) == plain


def test_fingerprint_exclude_hook_gives_backbone_only_id():
    model = tiny_llama()
    fp = base_fingerprint(model, exclude=lambda name: name.startswith("lm_head"))
    assert fp["num_tensors"] == 20 and fp["id"] != base_fingerprint(model)["id"]
    # Same backbone under another head type (and label config): same backbone-only id.
    classifier = LlamaForSequenceClassification(LlamaConfig(**TINY, num_labels=1))
    classifier.model.load_state_dict(model.model.state_dict())
    backbone = lambda name: not name.startswith("model.")  # noqa: E731
    assert base_fingerprint(classifier, exclude=backbone)["id"] == base_fingerprint(model, exclude=backbone)["id"]


def test_fingerprint_is_fast_on_100m_parameters():
    model = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(25_000_000)) for _ in range(4)])
    base_fingerprint(model)  # warm up allocator / kernels
    start = time.perf_counter()
    fp = base_fingerprint(model)
    elapsed = time.perf_counter() - start
    print(f"\nbase_fingerprint on {fp['num_params']:,} float32 params: {elapsed * 1000:.0f} ms")
    assert fp["num_params"] == 100_000_000


# --- atomic save / manifest --------------------------------------------------------------------


def test_atomic_save_writes_manifest_listing_every_file(tmp_path):
    fp = base_fingerprint(tiny_llama())
    metadata = {"base_fingerprint": fp, "library_versions": library_versions()}
    final = tmp_path / "checkpoint-1"
    with atomic_checkpoint_dir(final, metadata) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".tmp-checkpoint-1-")
        (tmp / "adapter.safetensors").write_bytes(b"weights")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "optimizer.pt").write_bytes(b"x" * 1000)
        metadata["trainer_class"] = "GRPOTrainer"  # read at exit
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]
    manifest = json.loads((final / MANIFEST_NAME).read_text())
    assert manifest["format"] == 1 and manifest["trainer_class"] == "GRPOTrainer"
    assert manifest["base_fingerprint"] == fp
    assert manifest["files"]["sub/optimizer.pt"]["bytes"] == 1000
    assert sorted(manifest["files"]) == ["adapter.safetensors", "sub/optimizer.pt"]
    assert is_complete(final) and verify_checkpoint(final, expected_base=fp) == manifest


def test_exception_inside_save_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_checkpoint_dir(tmp_path / "checkpoint-1") as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_reserved_metadata_key_fails_cleanly(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        write_checkpoint(tmp_path / "checkpoint-1", {"files": {}})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_resave_replaces_existing_checkpoint(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    final = write_checkpoint(tmp_path / "checkpoint-3", {"attempt": 1}, n_files=3)
    with atomic_checkpoint_dir(final, {"attempt": 2}) as tmp:
        (tmp / "only.bin").write_bytes(b"new")
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-3"]
    manifest = verify_checkpoint(final)
    assert manifest["attempt"] == 2 and sorted(p.name for p in final.iterdir()) == ["only.bin", MANIFEST_NAME]


# --- verification -------------------------------------------------------------------------------


def test_verify_detects_corrupted_byte(tmp_path):
    final = write_checkpoint(tmp_path / "checkpoint-1")
    data = bytearray((final / "file1.bin").read_bytes())
    data[7] ^= 0xFF
    (final / "file1.bin").write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError, match="file1.bin") as info:
        verify_checkpoint(final)
    assert info.value.file == "file1.bin"


def test_verify_detects_missing_file_and_manifest(tmp_path):
    final = write_checkpoint(tmp_path / "checkpoint-1")
    (final / "file2.bin").unlink()
    with pytest.raises(MissingFileError, match="file2.bin") as info:
        verify_checkpoint(final)
    assert info.value.file == "file2.bin"
    (final / MANIFEST_NAME).unlink()
    assert not is_complete(final)
    with pytest.raises(IncompleteCheckpointError):
        verify_checkpoint(final)


def test_verify_warns_about_unlisted_files(tmp_path, caplog):
    final = write_checkpoint(tmp_path / "checkpoint-1")
    (final / "added_later.json").write_text("{}")
    with caplog.at_level(logging.WARNING, logger="perl_plugins.checkpoint.store"):
        verify_checkpoint(final)
    assert "added_later.json" in caplog.text


def test_verify_rejects_other_base_with_helpful_message(tmp_path):
    trained_on = base_fingerprint(tiny_llama(seed=0))
    final = write_checkpoint(tmp_path / "checkpoint-1", {"base_fingerprint": trained_on})
    other_model = tiny_llama(seed=1)
    other_model.config._name_or_path = "org/other-base"
    other = base_fingerprint(other_model)
    with pytest.raises(BaseMismatchError) as info:
        verify_checkpoint(final, expected_base=other)
    message = str(info.value)
    print("\n" + message)
    assert trained_on["id"] in message and other["id"] in message
    assert "'org/other-base'" in message and "hidden_size=32" in message and "weight values" in message
    assert info.value.checkpoint_base == trained_on and info.value.given_base == other
    with pytest.raises(BaseMismatchError, match="no base fingerprint"):
        verify_checkpoint(write_checkpoint(tmp_path / "checkpoint-2"), expected_base=other)


# --- crash safety -------------------------------------------------------------------------------

CRASHING_SAVER = """
import logging, os, sys
from pathlib import Path
from perl_plugins.checkpoint.store import SAVE_DELAY_ENV, atomic_checkpoint_dir

logging.basicConfig(level=logging.WARNING)
out = Path(sys.argv[1])
for step in (1, 2):
    if step == 2:
        os.environ[SAVE_DELAY_ENV] = "5"
    with atomic_checkpoint_dir(out / f"checkpoint-{step}", {"step": step}) as tmp:
        for i in range(4):
            (tmp / f"part{i}.bin").write_bytes(os.urandom(4096))
print("save 2 finished", flush=True)
"""


def test_killed_mid_save_keeps_previous_checkpoint(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop(SAVE_DELAY_ENV, None)
    child = subprocess.Popen(
        [sys.executable, "-c", CRASHING_SAVER, str(tmp_path)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stderr = []
    for line in child.stderr:  # the hook announces itself right before sleeping
        stderr.append(line)
        if SAVE_DELAY_ENV in line:
            break
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL, "".join(stderr)
    assert "finished" not in child.stdout.read()

    ckpt1 = tmp_path / "checkpoint-1"
    assert verify_checkpoint(ckpt1)["step"] == 1
    assert not is_complete(tmp_path / "checkpoint-2")
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-checkpoint-2-")]
    assert len(stale) == 1 and not is_complete(stale[0])
    assert latest_complete_checkpoint(tmp_path) == ckpt1
    assert prune_checkpoints(tmp_path, keep=3) == stale
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-1"]


# --- tensors / rng ------------------------------------------------------------------------------


def test_save_tensors_handles_views_and_shared_tensors(tmp_path):
    weight = torch.randn(4, 6)
    tensors = {"a": weight, "tied": weight, "transposed": weight.t(), "grad": torch.nn.Parameter(torch.ones(2))}
    save_tensors(tmp_path / "t.safetensors", tensors, metadata={"step": "3"})
    loaded = load_tensors(tmp_path / "t.safetensors")
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor.detach())
    with pytest.raises(MissingFileError):
        load_tensors(tmp_path / "absent.safetensors")


def _draw() -> tuple:
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()


def test_rng_state_round_trip(tmp_path):
    _draw()
    file = save_rng_state(tmp_path, rank=0)
    assert file.name == "rng_state.pth"
    expected = _draw()
    _draw()
    load_rng_state(tmp_path, rank=0)
    assert _draw() == expected
    assert isinstance(torch.load(file, weights_only=True)["numpy"], tuple)  # no numpy allow-list needed
    assert rng_state_filename(3, world_size=4) == "rng_state_3.pth"
    with pytest.raises(MissingFileError, match="rng_state_1.pth"):
        load_rng_state(tmp_path, rank=1, world_size=2)


def test_rng_state_is_restored_by_stock_trainer(tmp_path):
    from transformers import Trainer
    from transformers.training_args import ParallelMode

    save_rng_state(tmp_path)
    expected = _draw()
    fake_trainer = SimpleNamespace(
        args=SimpleNamespace(world_size=1, process_index=0, parallel_mode=ParallelMode.NOT_DISTRIBUTED)
    )
    Trainer._load_rng_state(fake_trainer, str(tmp_path))
    assert _draw() == expected


# --- discovery / pruning ------------------------------------------------------------------------


def test_latest_complete_checkpoint_orders_by_step(tmp_path):
    assert latest_complete_checkpoint(tmp_path / "missing") is None
    for step in (2, 9, 10):
        write_checkpoint(tmp_path / f"checkpoint-{step}")
    (tmp_path / "checkpoint-11").mkdir()  # crashed stock save: no manifest
    assert latest_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-10"


def test_prune_respects_keep_and_protect(tmp_path):
    for step in range(1, 6):
        write_checkpoint(tmp_path / f"checkpoint-{step}")
    (tmp_path / "checkpoint-6").mkdir()  # incomplete: not ours to delete
    (tmp_path / ".tmp-checkpoint-7-dead").mkdir()
    removed = prune_checkpoints(tmp_path, keep=2, protect=tmp_path / "checkpoint-1")
    assert sorted(p.name for p in removed) == [".tmp-checkpoint-7-dead", "checkpoint-2", "checkpoint-3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-1",
        "checkpoint-4",
        "checkpoint-5",
        "checkpoint-6",
    ]
    # keep=1 still never removes the newest complete checkpoint, even with a newer incomplete one.
    prune_checkpoints(tmp_path, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-5", "checkpoint-6"]
    with pytest.raises(ValueError):
        prune_checkpoints(tmp_path, keep=0)


def test_prune_spares_save_in_flight(tmp_path):
    write_checkpoint(tmp_path / "checkpoint-1")
    with atomic_checkpoint_dir(tmp_path / "checkpoint-2") as tmp:
        (tmp / "a.bin").write_bytes(b"a")
        assert prune_checkpoints(tmp_path, keep=1) == []
    assert latest_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-2"


def test_library_versions():
    versions = library_versions()
    assert versions["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert {"python", "transformers", "trl", "peft", "accelerate", "safetensors", "perl_plugins"} <= versions.keys()
