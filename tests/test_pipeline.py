"""A checkpoint's whole way into a stream (intake → gates → fold → commit): versions, duplicates, rejections that
change nothing, restarts, crash recovery."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from mergeops.commit.folders import SPARE_STATE
from mergeops.commit.owner import OWNER_FILE
from mergeops.errors import PolicyError
from mergeops.ledger import Ledger
from mergeops.model import folder_digest
from mergeops.pipeline import fold_checkpoint
from mergeops.policy import GateConfig, load_policy
from tests.adapters import adapter_and_merged
from tests.adapters import tiny_base as make_tiny_base
from tests.conftest import write_model
from tests.fold import reference
from tests.fold.streams import (
    CONFIG,
    assert_close,
    make_base,
    make_checkpoints,
    read_floats,
    read_model,
    write_policy,
)


def tree(*roots) -> dict[str, str]:
    """Every file (and link target) under ``roots``, hashed: to prove nothing changed. The spare state is scratch
    space, not part of any version: a fold may overwrite it before it is rejected."""
    found = {}
    for root in roots:
        for path in sorted(root.rglob("*")) if root.exists() else []:
            if SPARE_STATE in path.parts:
                continue
            key = str(path)
            if path.is_symlink():
                found[key] = "link:" + os.readlink(path)
            elif path.is_file() and not path.name.startswith(("ledger", ".ledger")):
                found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@pytest.fixture
def stream(tmp_path):
    base_path, base = make_base(tmp_path)
    checkpoints = make_checkpoints(tmp_path, base, 3, curvature=True, metrics=True)
    policy = load_policy(write_policy(tmp_path, base_path, "opcm", keep=2))
    return policy, base, checkpoints


def test_versions_latest_link_and_pruning(stream):
    policy, _, checkpoints = stream
    results = [fold_checkpoint(policy, "s", c) for c in checkpoints]
    assert [r.version for r in results] == [1, 2, 3]
    out = policy.streams["s"].output
    assert os.readlink(out / "latest") == "v0003"
    assert sorted(p.name for p in out.iterdir()) == [OWNER_FILE, "latest", "v0002", "v0003"]  # keep = 2
    state_root = policy.home / "streams" / "s" / "state"
    assert sorted(p.name for p in state_root.iterdir()) == [SPARE_STATE, "v0003"]  # the spare: v0002's state
    assert results[-1].output_digest == folder_digest(out / "v0003")
    assert (out / "v0003" / "config.json").read_text() == json.dumps(CONFIG)


def test_the_state_before_the_head_is_overwritten_by_the_next_fold_instead_of_deleted(stream):
    policy, _, checkpoints = stream
    state_root = policy.home / "streams" / "s" / "state"
    fold_checkpoint(policy, "s", checkpoints[0])
    first = {p.name: p.stat().st_ino for p in (state_root / "v0001").glob("*.safetensors")}
    fold_checkpoint(policy, "s", checkpoints[1])
    assert {p.name: p.stat().st_ino for p in (state_root / SPARE_STATE).glob("*.safetensors")} == first
    fold_checkpoint(policy, "s", checkpoints[2])
    assert {p.name: p.stat().st_ino for p in (state_root / "v0003").glob("*.safetensors")} == first


def test_a_spare_that_cannot_be_replaced_costs_time_not_the_fold(stream):
    policy, _, checkpoints = stream
    state_root = policy.home / "streams" / "s" / "state"
    fold_checkpoint(policy, "s", checkpoints[0])
    (state_root / SPARE_STATE).write_text("not a folder")
    assert fold_checkpoint(policy, "s", checkpoints[1]).status == "merged"
    assert sorted(p.name for p in state_root.iterdir()) == [SPARE_STATE, "v0002"]  # v0001 removed instead
    assert fold_checkpoint(policy, "s", checkpoints[2]).version == 3


def test_a_state_written_over_the_spare_is_byte_identical_to_one_written_afresh(stream, tmp_path):
    policy, _, checkpoints = stream
    fresh = load_policy(write_policy(tmp_path / "fresh", policy.streams["s"].base, "opcm", keep=2))
    for checkpoint in checkpoints:
        fold_checkpoint(policy, "s", checkpoint)
        shutil.rmtree(fresh.home / "streams" / "s" / "state" / SPARE_STATE, ignore_errors=True)
        fold_checkpoint(fresh, "s", checkpoint)
    recycled, written = (p.home / "streams" / "s" / "state" / "v0003" for p in (policy, fresh))
    assert sorted(p.name for p in recycled.iterdir()) == sorted(p.name for p in written.iterdir())
    for path in recycled.iterdir():
        assert path.read_bytes() == (written / path.name).read_bytes(), path.name


def test_output_carries_lineage_metadata(stream):
    from safetensors import safe_open

    policy, _, checkpoints = stream
    first = fold_checkpoint(policy, "s", checkpoints[0])
    second = fold_checkpoint(policy, "s", checkpoints[1])
    with safe_open(second.output / "model.safetensors", framework="pt") as f:
        metadata = f.metadata()
    assert metadata["mergeops.stream"] == "s" and metadata["mergeops.version"] == "2"
    assert metadata["mergeops.method"] == "opcm"
    assert json.loads(metadata["mergeops.parents"]) == [first.output_digest, second.digest]


def test_same_digest_twice_is_a_duplicate_and_changes_nothing(stream, tmp_path):
    policy, _, checkpoints = stream
    fold_checkpoint(policy, "s", checkpoints[0])
    copy = shutil.copytree(checkpoints[0], tmp_path / "copy")  # same content elsewhere: same identity
    before = tree(policy.home, policy.streams["s"].output)
    result = fold_checkpoint(policy, "s", copy)
    assert (result.status, result.version) == ("duplicate", 1)
    assert tree(policy.home, policy.streams["s"].output) == before


def _nan_checkpoint(tmp_path, base):
    tensors = {n: t.clone() for n, t in base.items()}
    tensors["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    return write_model(tmp_path / "bad", tensors, config=CONFIG)


def _wrong_shape(tmp_path, base):
    tensors = {n: t.clone() for n, t in base.items()} | {"model.norm.weight": torch.ones(17)}
    return write_model(tmp_path / "bad", tensors, config=CONFIG)


def _other_architecture(tmp_path, base):
    return write_model(tmp_path / "bad", dict(base), config={"architectures": ["GPT2LMHeadModel"]})


def _changed_integer(tmp_path, base):
    return write_model(tmp_path / "bad", dict(base) | {"model.position_ids": torch.arange(1, 9)}, config=CONFIG)


def _truncated(tmp_path, base):
    path = write_model(tmp_path / "bad", dict(base), config=CONFIG)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    return path


def _pickle_only(tmp_path, base):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "pytorch_model.bin").write_bytes(b"\x80\x04N.")
    return tmp_path / "bad"


def _overflows_float32_arithmetic(tmp_path, base):
    tensors = {n: t.clone() for n, t in base.items()}
    tensors["model.layers.0.mlp.up_proj.weight"][:4] = 3e38  # finite in float32; its square and its norm are not
    return write_model(tmp_path / "bad", tensors, config=CONFIG)


def _beyond_float32(tmp_path, base):
    tensors = {n: t.double() if t.is_floating_point() else t.clone() for n, t in base.items()}
    tensors["model.norm.weight"][3] = 1e300  # finite in float64, Inf once converted for the arithmetic
    return write_model(tmp_path / "bad", tensors, config=CONFIG)


def _non_utf8_tensor_name(tmp_path, base):
    path = write_model(tmp_path / "bad", dict(base), config=CONFIG)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes().replace(b"model.norm.weight", b"model.norm.w\xffight", 1))
    return path


def _symlink_loop(tmp_path, base):
    path = write_model(tmp_path / "bad", dict(base), config=CONFIG)
    os.symlink(".", path / "a")
    os.symlink(".", path / "b")
    return path


def _config(text: str):  # type: ignore[no-untyped-def]
    def make(tmp_path, base):  # type: ignore[no-untyped-def]
        path = write_model(tmp_path / "bad", dict(base), config=CONFIG)
        (path / "config.json").write_text(text)
        return path

    return make


def _preallocated(tmp_path, base):
    """A producer that preallocates the weights file to its full length: valid header, bytes still zero."""
    tensors = {n: torch.zeros_like(t) if t.is_floating_point() else t.clone() for n, t in base.items()}
    return write_model(tmp_path / "bad", tensors, config=CONFIG)


def _no_config(tmp_path, base):
    tensors = {n: t.clone() for n, t in base.items()}
    tensors["model.norm.weight"] += 0.5  # new weights, so that it is not a duplicate of anything folded
    return write_model(tmp_path / "bad", tensors)


@pytest.mark.parametrize("folded_before", [1, 2], ids=["no-spare", "spare"])
@pytest.mark.parametrize(("make_bad", "needle"), [
    (_nan_checkpoint, "'model.layers.0.mlp.up_proj.weight'"),
    (_overflows_float32_arithmetic, "non-finite value(s) in float32 (an overflow"),
    (_beyond_float32, "beyond float32's range"),
    (_non_utf8_tensor_name, "not UTF-8 text"),
    (_symlink_loop, "symlink loop"),
    (_config("{not json"), "config.json is not valid JSON"),
    (_config("[1, 2]"), "config.json is a JSON list, not an object"),
    (_config('{"architectures": {"LlamaForCausalLM": 1}}'), "'architectures' that is not a list"),
    (_preallocated, "is all zeros where the base's is not"),
    (_no_config, "has no config.json, which its base has"),
    (_wrong_shape, "'model.norm.weight'"),
    (_other_architecture, "GPT2LMHeadModel"),
    (_changed_integer, "'model.position_ids'"),
    (_truncated, "truncated"),
    (_pickle_only, "pickle"),
])
def test_a_rejected_checkpoint_leaves_the_stream_byte_for_byte_unchanged(stream, tmp_path, make_bad, needle,
                                                                          folded_before):
    policy, base, checkpoints = stream
    for checkpoint in checkpoints[:folded_before]:  # a second fold makes a spare state, which a rejection may use up
        fold_checkpoint(policy, "s", checkpoint)
    before = tree(policy.home, policy.streams["s"].output)
    result = fold_checkpoint(policy, "s", make_bad(tmp_path, base))
    assert result.status == "rejected" and needle in result.reason
    assert tree(policy.home, policy.streams["s"].output) == before
    with Ledger.open_readonly(policy.home) as ledger:
        assert ledger.rejections("s")[-1].reason == result.reason
    assert fold_checkpoint(policy, "s", checkpoints[folded_before]).version == folded_before + 1  # it goes on


def test_ota_rejects_a_checkpoint_without_curvature_and_says_how_to_make_it(tmp_path):
    base_path, base = make_base(tmp_path)
    checkpoint = make_checkpoints(tmp_path, base, 1)[0]
    policy = load_policy(write_policy(tmp_path, base_path, "ota"))
    result = fold_checkpoint(policy, "s", checkpoint)
    assert result.status == "rejected" and result.gate == "curvature"
    assert "mergeops curvature import" in result.reason
    assert [p.name for p in policy.streams["s"].output.iterdir()] == [OWNER_FILE]  # no version


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1e-6], ids=["nan", "inf", "negative"])
def test_ota_rejects_negative_or_non_finite_curvature_naming_file_and_tensor(tmp_path, bad):
    from safetensors.torch import load_file, save_file

    base_path, base = make_base(tmp_path)
    first, second = make_checkpoints(tmp_path, base, 2, curvature=True)
    policy = load_policy(write_policy(tmp_path, base_path, "ota"))
    fold_checkpoint(policy, "s", first)
    curvature = load_file(second / "exp_avg_sq.safetensors")
    curvature["model.layers.0.mlp.up_proj.weight"][3, 5] = bad
    save_file(curvature, second / "exp_avg_sq.safetensors")
    before = tree(policy.home, policy.streams["s"].output)
    result = fold_checkpoint(policy, "s", second)
    assert result.status == "rejected" and result.gate == "curvature"
    assert "exp_avg_sq.safetensors" in result.reason and "model.layers.0.mlp.up_proj.weight" in result.reason
    assert tree(policy.home, policy.streams["s"].output) == before


def test_ota_rejects_weights_that_overflow_float32_instead_of_merging_garbage(tmp_path):
    base_path, base = make_base(tmp_path)
    [first] = make_checkpoints(tmp_path, base, 1, curvature=True, metrics=True)
    policy = load_policy(write_policy(tmp_path, base_path, "ota", {"metric": "step", "penalty": 20.0}))
    result = fold_checkpoint(policy, "s", first)  # step 100: a multiplier of 1e40, past float32's 3.4e38
    assert result.status == "rejected" and result.gate == "curvature"
    assert "overflow float32" in result.reason and "penalty" in result.reason
    # no version, and nothing half written: only the folder's owner marker
    assert [p.name for p in policy.streams["s"].output.iterdir()] == [OWNER_FILE]


def test_mwa_rejects_a_checkpoint_without_its_metric(tmp_path):
    base_path, base = make_base(tmp_path)
    checkpoint = make_checkpoints(tmp_path, base, 1)[0]
    policy = load_policy(write_policy(tmp_path, base_path, "mwa", {"metric": "loss"}))
    result = fold_checkpoint(policy, "s", checkpoint)
    assert result.status == "rejected" and "'loss'" in result.reason and "--metrics" in result.reason


def test_metrics_file_and_trainer_state_feed_mwa(tmp_path):
    base_path, base = make_base(tmp_path)
    checkpoints = make_checkpoints(tmp_path, base, 2)
    (checkpoints[0] / "trainer_state.json").write_text(json.dumps(
        {"global_step": 50, "log_history": [{"loss": 3.0, "step": 10}, {"loss": 2.0, "step": 50}, {"eval_loss": 9}]}))
    (tmp_path / "m.json").write_text(json.dumps({"loss": 0.5}))
    policy = load_policy(write_policy(tmp_path, base_path, "mwa", {"metric": "loss"}))
    fold_checkpoint(policy, "s", checkpoints[0])
    result = fold_checkpoint(policy, "s", checkpoints[1], metrics_file=tmp_path / "m.json")
    models = [read_model(c) for c in checkpoints]
    assert_close(read_floats(result.output), reference.weighted_average(base, models, [1 / 2.0, 1 / 0.5]))


def test_mwa_window_rebuilds_when_the_expired_checkpoint_is_gone(tmp_path):
    base_path, base = make_base(tmp_path)
    checkpoints = make_checkpoints(tmp_path, base, 4, metrics=True)
    policy = load_policy(write_policy(tmp_path, base_path, "mwa", {"metric": "loss", "window": 2}))
    models = [read_model(c) for c in checkpoints]
    losses = [json.loads((c / "metrics.json").read_text())["loss"] for c in checkpoints]
    for checkpoint in checkpoints[:3]:
        fold_checkpoint(policy, "s", checkpoint)
    shutil.rmtree(checkpoints[1])  # it expires with the next fold
    result = fold_checkpoint(policy, "s", checkpoints[3])
    assert result.status == "merged" and "rebuilt" in " ".join(result.notes)
    expected = reference.weighted_average(base, models[2:], [1 / x for x in losses[2:]])
    assert_close(read_floats(result.output), expected)


def test_changing_method_or_parameters_of_a_running_stream_is_refused(stream, tmp_path):
    policy, _, checkpoints = stream
    fold_checkpoint(policy, "s", checkpoints[0])
    changed = load_policy(write_policy(tmp_path, policy.streams["s"].base, "opcm", {"alpha": 0.9}))
    with pytest.raises(PolicyError, match="cannot change method or parameters"):
        fold_checkpoint(changed, "s", checkpoints[1])


def _cli_fold(policy_path, checkpoint):
    return subprocess.run([sys.executable, "-m", "mergeops", "fold", str(checkpoint), "--policy", str(policy_path),
                           "--json"], capture_output=True, text=True, timeout=120)


def test_restart_in_a_new_process_gives_identical_results(tmp_path):
    base_path, base = make_base(tmp_path)
    checkpoints = make_checkpoints(tmp_path, base, 4)
    uninterrupted = load_policy(write_policy(tmp_path / "a", base_path, "opcm", {"zero_diagonal": True}))
    for checkpoint in checkpoints:
        last = fold_checkpoint(uninterrupted, "s", checkpoint)
    split = write_policy(tmp_path / "b", base_path, "opcm", {"zero_diagonal": True})
    for checkpoint in checkpoints:  # every fold in its own process
        result = json.loads(_cli_fold(split, checkpoint).stdout)
    assert result["version"] == 4
    assert result["output_digest"] == last.output_digest  # byte-identical weights, config and all


_SLOW_FOLD = """
import sys, time
import mergeops.model.writer as writer
original = writer.write_at
def slow_write_at(*args):  # widen the window in which a kill lands mid-fold
    time.sleep(0.004)
    original(*args)
writer.write_at = slow_write_at
from mergeops.cli import main
sys.argv = ["mergeops", "fold", sys.argv[1], "--policy", sys.argv[2]]
print("ready", flush=True)
main()
"""


@pytest.mark.parametrize("kill_after", [0.02, 0.08, 0.15, 0.25])
def test_kill_9_mid_fold_then_redo_converges_to_the_uninterrupted_result(tmp_path, kill_after):
    base_path, base = make_base(tmp_path)
    checkpoints = make_checkpoints(tmp_path, base, 3)
    reference_policy = load_policy(write_policy(tmp_path / "a", base_path, "opcm"))
    for checkpoint in checkpoints:
        expected = fold_checkpoint(reference_policy, "s", checkpoint)
    policy_path = write_policy(tmp_path / "b", base_path, "opcm")
    policy = load_policy(policy_path)
    fold_checkpoint(policy, "s", checkpoints[0])
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_FOLD, str(checkpoints[1]), str(policy_path)],
                            stdout=subprocess.PIPE)
    assert proc.stdout.readline() == b"ready\n"
    time.sleep(kill_after)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    for checkpoint in checkpoints[1:]:  # redo: a finished fold is a duplicate, an unfinished one runs again
        result = fold_checkpoint(policy, "s", checkpoint)
        assert result.status in ("merged", "duplicate")
    with Ledger.open_readonly(policy.home) as ledger:
        assert ledger.head("s").output_digest == expected.output_digest
    leftovers = [p for p in (tmp_path / "b").rglob("*") if ".tmp-" in p.name]
    assert leftovers == []


def test_a_diverged_training_loss_is_a_clear_rejection(tmp_path):
    base_path, base = make_base(tmp_path)
    checkpoint = make_checkpoints(tmp_path, base, 1)[0]
    (checkpoint / "trainer_state.json").write_text('{"global_step": 10, "log_history": [{"loss": NaN}]}')
    policy = load_policy(write_policy(tmp_path, base_path, "mwa", {"metric": "loss"}))
    result = fold_checkpoint(policy, "s", checkpoint)
    assert result.status == "rejected" and "'loss' is nan" in result.reason


def test_latest_is_repaired_to_the_recorded_head_before_the_next_fold(stream, tmp_path):
    policy, base, checkpoints = stream
    fold_checkpoint(policy, "s", checkpoints[0])
    fold_checkpoint(policy, "s", checkpoints[1])
    out = policy.streams["s"].output
    (out / "latest").unlink()
    (out / "latest").symlink_to("v0001")  # as if a crash came between recording v0002 and moving the link
    result = fold_checkpoint(policy, "s", _nan_checkpoint(tmp_path, base))
    assert result.status == "rejected" and os.readlink(out / "latest") == "v0002"


def test_a_checkpoint_folded_before_is_a_duplicate_even_when_a_gate_would_now_reject_it(stream, tmp_path):
    policy, _, checkpoints = stream
    fold_checkpoint(policy, "s", checkpoints[0])
    stricter = GateConfig(licenses=("nothing-has-this-license",))
    policy.streams["s"] = dataclasses.replace(policy.streams["s"], gate=stricter)
    before = tree(policy.home, policy.streams["s"].output)
    assert fold_checkpoint(policy, "s", checkpoints[1]).status == "rejected"  # the gate is on
    result = fold_checkpoint(policy, "s", checkpoints[0])
    assert (result.status, result.version) == ("duplicate", 1)
    assert tree(policy.home, policy.streams["s"].output) == before


def test_float64_checkpoints_fold_in_float32_with_every_method(tmp_path):
    base_path, base = make_base(tmp_path, dtype=torch.float64)
    checkpoints = make_checkpoints(tmp_path, base, 2)
    for method in ("opcm", "average", "ties", "magmax", "task_arithmetic"):
        policy = load_policy(write_policy(tmp_path / method, base_path, method))
        assert [fold_checkpoint(policy, "s", c).status for c in checkpoints] == ["merged", "merged"], method


def test_an_output_dtype_that_overflows_is_a_rejection_naming_the_tensor(tmp_path):
    base_path, base = make_base(tmp_path)
    tensors = {n: t.clone() for n, t in base.items()}
    tensors["model.norm.weight"][0] = 1e6  # fine in float32, Inf in float16
    checkpoint = write_model(tmp_path / "big", tensors, config=CONFIG)
    policy = load_policy(write_policy(tmp_path, base_path, "average", dtype="float16"))
    result = fold_checkpoint(policy, "s", checkpoint)
    assert result.status == "rejected" and result.gate == "finite"
    assert "'model.norm.weight'" in result.reason and "float16" in result.reason
    assert [p.name for p in (tmp_path / "out").iterdir()] == [OWNER_FILE]  # no version


def test_the_same_weights_with_other_files_beside_them_are_a_duplicate_not_a_new_version(stream, tmp_path):
    policy, _, checkpoints = stream
    assert fold_checkpoint(policy, "s", checkpoints[0]).version == 1
    copy = tmp_path / "same-weights"
    shutil.copytree(checkpoints[0], copy)
    (copy / "trainer_state.json").write_text('{"global_step": 10}')
    (copy / "generation_config.json").write_text("")
    before = tree(policy.home, policy.streams["s"].output)
    result = fold_checkpoint(policy, "s", copy)
    assert result.status == "duplicate" and result.version == 1 and "the same weights" in result.reason
    (copy / "config.json").unlink()  # even without its config: these weights are in version 1
    assert fold_checkpoint(policy, "s", copy).status == "duplicate"
    assert tree(policy.home, policy.streams["s"].output) == before
    with Ledger.open_readonly(policy.home) as ledger:
        recorded = json.loads(ledger.events()[-1]["payload"])["checkpoint"]
    assert recorded["weights_digest"].startswith("sha256:") and recorded["weights_digest"] != recorded["digest"]


def test_a_failed_record_leaves_no_version_and_a_record_that_went_through_keeps_it(stream, tmp_path, monkeypatch):
    """Until the ledger holds the version a failure removes its folders; once it holds it (the failure came after the
    transaction, writing the signed head), the folders are the version's and stay."""
    import errno

    policy, _, checkpoints = stream

    def full(self, *events):
        raise OSError(errno.ENOSPC, "No space left on device", str(policy.home / "ledger.db"))

    with monkeypatch.context() as patch:
        patch.setattr(Ledger, "record", full)
        with pytest.raises(Exception, match="space"):
            fold_checkpoint(policy, None, checkpoints[0])
    assert not (tmp_path / "out" / "v0001").exists()
    assert not (policy.home / "streams" / "s" / "state" / "v0001").exists()

    def head_lost(self, event):
        raise OSError(errno.EIO, "I/O error")

    with monkeypatch.context() as patch:
        patch.setattr(Ledger, "_write_head", head_lost)
        with pytest.raises(OSError, match="I/O error"):
            fold_checkpoint(policy, None, checkpoints[0])
    assert (tmp_path / "out" / "v0001").is_dir()
    with Ledger.open_readonly(policy.home) as ledger:
        assert ledger.head("s").version == 1


def test_the_marks_of_an_allowed_protected_checkpoint_are_recorded_when_a_later_gate_rejects_it(tmp_path):
    base_path, base = make_base(tmp_path)
    marks = {"mergelock.scheme": "mergelock-v2", "mergelock.version": "2", "mergelock.strength": "6"}
    protected = write_model(tmp_path / "locked", {n: t.clone() for n, t in base.items()}, config=CONFIG, metadata=marks)
    path = write_policy(tmp_path, base_path, "average")
    path.write_text(path.read_text().replace("[streams.s.params]", '[streams.s.gate]\nallow_protected = true\n'
                                             'licenses = ["mit"]\n[streams.s.params]'))
    policy = load_policy(path)
    result = fold_checkpoint(policy, None, protected)
    assert (result.status, result.gate) == ("rejected", "licenses")
    with Ledger.open_readonly(policy.home) as ledger:
        [rejected] = [json.loads(e["payload"]) for e in ledger.events() if e["kind"] == "checkpoint.rejected"]
    assert rejected["checkpoint"]["mergelock"] == {"scheme": "mergelock-v2", "version": "2", "strength": "6",
                                                  "allowed": True}


def test_a_pretrained_bert_fine_tuned_and_saved_by_todays_transformers_folds_with_the_bases_buffers(tmp_path):
    """all-MiniLM-L6-v2 as packaged holds ``embeddings.position_ids``; the installed transformers saves a fine-tune of
    it without that buffer. The fine-tune folds; the merged model holds the base's buffer; the ledger says so."""
    transformers = pytest.importorskip("transformers")
    from tests.protect.conftest import minilm_dir

    base_path = minilm_dir()
    model = transformers.AutoModel.from_pretrained(base_path)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 1e-3)
    model.save_pretrained(tmp_path / "fine-tune")
    assert "embeddings.position_ids" not in read_model(tmp_path / "fine-tune")  # what today's transformers saves
    policy = load_policy(write_policy(tmp_path, base_path, "average"))
    result = fold_checkpoint(policy, None, tmp_path / "fine-tune")
    assert result.status == "merged", result.reason
    merged, base = read_model(result.output), read_model(base_path)
    assert torch.equal(merged["embeddings.position_ids"], base["embeddings.position_ids"])
    assert torch.allclose(merged["encoder.layer.0.attention.self.query.weight"],
                          read_model(tmp_path / "fine-tune")["encoder.layer.0.attention.self.query.weight"])
    with Ledger.open_readonly(policy.home) as ledger:
        [committed] = [json.loads(e["payload"]) for e in ledger.events() if e["kind"] == "version.committed"]
    assert committed["checkpoint"]["carried_from_base"] == ["embeddings.position_ids"]


# -- vocabularies and ties: tiny Llama models saved by the installed transformers, with real tokenizers ------------


def _cut_to_base(checkpoint, base, out):  # type: ignore[no-untyped-def]
    """The reference for vocab = "base", built with transformers alone: the checkpoint's rows of the base's tokens,
    looked up through its own tokenizer, in the base's order; the base's tokenizer."""
    transformers = pytest.importorskip("transformers")
    base_tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    ours = transformers.AutoTokenizer.from_pretrained(checkpoint)
    index = ours.convert_tokens_to_ids(base_tokenizer.convert_ids_to_tokens(list(range(len(base_tokenizer)))))
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)
    rows = [model.get_input_embeddings().weight[index].clone(), model.get_output_embeddings().weight[index].clone()]
    model.resize_token_embeddings(len(base_tokenizer))
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(rows[0])
        model.get_output_embeddings().weight.copy_(rows[1])
    model.save_pretrained(out)
    base_tokenizer.save_pretrained(out)
    return out


def _with_loss(path, loss):  # type: ignore[no-untyped-def]
    (path / "metrics.json").write_text(json.dumps({"loss": loss}))
    return path


@pytest.mark.parametrize("change", ["added", "moved"])
def test_vocab_base_folds_the_rows_of_the_bases_tokens_as_the_checkpoint_cut_back_to_them(tmp_path, change):
    """A fine-tune that added tokens (or moved ids) folds as the same fine-tune cut back to the base's tokens by
    transformers, also when MWA re-reads it as it leaves the window; the ledger names the tokens dropped."""
    from tests.intake.finetunes import WORDS, finetune, save_model

    base = save_model(tmp_path / "base", "llama", WORDS)
    kind = {"added": ["<tool>", "<think>"]} if change == "added" else {"words": WORDS[:5] + WORDS[5:][::-1]}
    changed = _with_loss(finetune(base, tmp_path / "changed", seed=1, **kind), 0.5)
    cut = _with_loss(_cut_to_base(changed, base, tmp_path / "cut"), 0.5)
    later = [_with_loss(finetune(base, tmp_path / f"later{i}", seed=2 + i), 0.4 + i / 10) for i in range(2)]
    results = {}
    for name, first in (("changed", changed), ("cut", cut)):
        policy = load_policy(write_policy(tmp_path / f"stream-{name}", base, "mwa", {"window": 2}, vocab="base"))
        folded = [fold_checkpoint(policy, None, path) for path in (first, *later)]
        assert [r.status for r in folded] == ["merged"] * 3, [r.reason for r in folded]
        assert not folded[-1].notes  # the first checkpoint left the window by being re-read, not by a rebuild
        results[name] = [read_model(r.output) for r in folded]
        with Ledger.open_readonly(policy.home) as ledger:
            first_version = next(json.loads(e["payload"]) for e in ledger.events() if e["kind"] == "version.committed")
        dropped = {"changed": kind.get("added", []), "cut": None}[name]
        assert first_version["checkpoint"].get("vocab_dropped") == dropped
    for ours, expected in zip(results["changed"], results["cut"], strict=True):
        assert set(ours) == set(expected)
        for tensor in expected:
            assert torch.equal(ours[tensor], expected[tensor]), tensor


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_a_tied_checkpoint_folds_its_own_embeddings_as_its_head(tmp_path, family):
    """The base stores its head; the fine-tune ties it and transformers saves it once: the merged head is the
    checkpoint's embedding matrix (as transformers loads the checkpoint), not the base's head, and the ledger says
    it was tied."""
    transformers = pytest.importorskip("transformers")
    from tests.intake.finetunes import WORDS, finetune, save_model

    base = save_model(tmp_path / "base", family, WORDS, tie_word_embeddings=False)
    checkpoint = finetune(base, tmp_path / "ck", seed=1, tie=True)
    policy = load_policy(write_policy(tmp_path / "stream", base, "average"))
    result = fold_checkpoint(policy, None, checkpoint)
    assert result.status == "merged", result.reason
    auto = transformers.AutoModelForMaskedLM if family == "bert" else transformers.AutoModelForCausalLM
    loaded = auto.from_pretrained(checkpoint).state_dict()
    merged, base_tensors = read_model(result.output), read_model(base)
    head = {"llama": "lm_head.weight", "gpt2": "lm_head.weight", "bert": "cls.predictions.decoder.weight"}[family]
    assert torch.equal(merged[head], loaded[head]) and not torch.equal(merged[head], base_tensors[head])
    with Ledger.open_readonly(policy.home) as ledger:
        [committed] = [json.loads(e["payload"]) for e in ledger.events() if e["kind"] == "version.committed"]
    assert head in committed["checkpoint"]["tied"]


def _tokenized_stream(tmp_path):  # type: ignore[no-untyped-def]
    from tests.intake.finetunes import WORDS, finetune, save_model

    base = save_model(tmp_path / "base", "llama", WORDS)
    policy = load_policy(write_policy(tmp_path / "stream", base, "average"))
    return policy, base, finetune


def _added_tokens(tmp_path, base, finetune):  # type: ignore[no-untyped-def]
    return finetune(base, tmp_path / "bad", seed=9, added=["<tool>", "<think>"])


def _other_tokenizer(tmp_path, base, finetune):  # type: ignore[no-untyped-def]
    bad = finetune(base, tmp_path / "bad", seed=9)
    text = (bad / "tokenizer.json").read_text()
    (bad / "tokenizer.json").write_text(text.replace('"type": "Whitespace"', '"type": "WhitespaceSplit"'))
    return bad


def _resized_without_tokenizer(tmp_path, base, finetune):  # type: ignore[no-untyped-def]
    bad = finetune(base, tmp_path / "bad", seed=9, added=["<tool>"])
    (bad / "tokenizer.json").unlink()
    (bad / "tokenizer_config.json").unlink()
    return bad


def _malformed_tokenizer(tmp_path, base, finetune):  # type: ignore[no-untyped-def]
    bad = finetune(base, tmp_path / "bad", seed=9)
    (bad / "tokenizer.json").write_bytes(b'{"model": {"type": "WordLevel", "vocab": {"a": 0, "b": 0}}}')
    return bad


def _head_left_out_without_a_tie(tmp_path, base, finetune):  # type: ignore[no-untyped-def]
    """A checkpoint that stores no head but says it does not tie lacks a tensor."""
    bad = finetune(base, tmp_path / "bad", seed=9, tie=True)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(config | {"tie_word_embeddings": False}))
    return bad


@pytest.mark.parametrize(("make_bad", "needle"), [
    (_added_tokens, "adds 2 token(s) the base lacks ('<tool>', '<think>')"),
    (_other_tokenizer, "tokenizer.json has a different pre_tokenizer"),
    (_resized_without_tokenizer, "15 vocabulary rows where the base has 14, and no tokenizer files"),
    (_malformed_tokenizer, "gives id 0 to two tokens"),
    (_head_left_out_without_a_tie, "lacks 1 tensor(s) of the base, first 'lm_head.weight'"),
])
def test_a_checkpoint_rejected_for_its_vocabulary_leaves_the_stream_unchanged(tmp_path, make_bad, needle):
    policy, base, finetune = _tokenized_stream(tmp_path)
    assert fold_checkpoint(policy, None, finetune(base, tmp_path / "good0", seed=1)).status == "merged"
    before = tree(policy.home, policy.streams["s"].output)
    result = fold_checkpoint(policy, None, make_bad(tmp_path, base, finetune))
    assert result.status == "rejected" and needle in result.reason, result.reason
    assert tree(policy.home, policy.streams["s"].output) == before
    with Ledger.open_readonly(policy.home) as ledger:
        assert ledger.rejections("s")[-1].reason == result.reason
    assert fold_checkpoint(policy, None, finetune(base, tmp_path / "good1", seed=2)).version == 2  # it goes on


def test_every_version_carries_the_bases_tokenizer_files_and_chat_template(tmp_path):
    """Whatever tokenizer files a checkpoint ships (here: its own, reordered), a version holds the base's, byte for
    byte: tokenizer.json, tokenizer_config.json, chat_template.jinja, vocab.txt, special_tokens_map.json, ..."""
    from mergeops.intake.tokenizer import TOKENIZER_FILES
    from tests.intake.finetunes import WORDS, finetune, save_model

    base = save_model(tmp_path / "base", "llama", WORDS)
    extra = {"chat_template.jinja": "{{ messages }}", "special_tokens_map.json": '{"pad_token": "[PAD]"}',
             "vocab.txt": "\n".join(WORDS) + "\n", "generation_config.json": "{}"}
    for name, text in extra.items():
        (base / name).write_text(text)
    policy = load_policy(write_policy(tmp_path / "stream", base, "average", vocab="base"))
    checkpoint = finetune(base, tmp_path / "ck", seed=1, words=WORDS[:5] + WORDS[5:][::-1])
    for name in extra:
        shutil.copy(base / name, checkpoint / name)
    (checkpoint / "vocab.txt").write_text("\n".join(WORDS[:5] + WORDS[5:][::-1]) + "\n")
    result = fold_checkpoint(policy, None, checkpoint)
    assert result.status == "merged", result.reason
    shipped = [n for n in TOKENIZER_FILES if (base / n).exists()]
    assert {"tokenizer.json", "tokenizer_config.json", *extra} - {"generation_config.json"} <= set(shipped)
    for name in [*shipped, "generation_config.json", "config.json"]:
        assert (result.output / name).read_bytes() == (base / name).read_bytes(), name


def test_an_opcm_stream_of_lora_adapters_equals_the_stream_of_their_merged_models(tmp_path):
    """Adapters go through intake, the ledger and a fold each, the method rebuilt from the stored state every time
    (as separate processes are), their sums kept as factors; the result is that of peft's merged models."""
    base = make_tiny_base(tmp_path, "llama")
    pairs = [adapter_and_merged(base, tmp_path / f"a{i}", seed=i, rank=rank, targets=targets, rslora=i == 2)
             for i, (rank, targets) in enumerate([(4, ["q_proj", "v_proj"]), (2, ["q_proj", "down_proj"]),
                                                  (3, ["v_proj", "o_proj", "q_proj"])], 1)]
    params = {"alpha": 0.5, "zero_diagonal": True}
    results = {}
    for kind, index in (("adapters", 0), ("full", 1)):
        policy = load_policy(write_policy(tmp_path / kind, base, "opcm", params))
        for pair in pairs:
            result = fold_checkpoint(policy, "s", pair[index])
            assert result.status == "merged", result.reason
        results[kind] = read_floats(result.output)
        state = sorted((tmp_path / kind / "state" / "streams" / "s" / "state").glob("v*"))[-1]
        kinds = {name.split("::")[0] for name in read_model(state)}
        assert kinds == ({"sum", "sum.left", "sum.right"} if kind == "adapters" else {"sum"})
    assert_close(results["adapters"], results["full"], rtol=1e-5)
