"""A checkpoint whose files are hostile (a FIFO where a file should be, JSON nested 100000 deep, an integer of 5000
digits, a key given twice, bytes that are not UTF-8) is rejected by name, at once: ``mergeops fold`` exits 3 within a
bound, the ledger records the rejection and the stream is unchanged. The fold runs as a real process with a time-out,
so a reader that would block on a FIFO fails the test instead of hanging it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from mergeops.commit.owner import OWNER_FILE
from mergeops.ledger import Ledger
from mergeops.policy import load_policy
from tests.fold.streams import make_base, make_checkpoints, write_policy

FOLD_BOUND = 90  # seconds: a fold of these tiny checkpoints takes a few; a blocked read takes forever


def fifo_at(name: str) -> Callable[[Path], None]:
    def spoil(checkpoint: Path) -> None:
        target = checkpoint / name if name != "first shard" else next(checkpoint.glob("model-00001-*.safetensors"))
        target.unlink(missing_ok=True)
        os.mkfifo(target)
    return spoil


def config_text(name: str, text: str | bytes) -> Callable[[Path], None]:
    def spoil(checkpoint: Path) -> None:
        data = text if isinstance(text, bytes) else text.encode()
        (checkpoint / name).write_bytes(data)
    return spoil


def _adapter_config_with(extra: str) -> Callable[[Path], None]:
    """adapter_config.json as peft wrote it, with ``extra`` spliced in as the first member."""
    def spoil(adapter: Path) -> None:
        text = (adapter / "adapter_config.json").read_text()
        (adapter / "adapter_config.json").write_text("{" + extra + ", " + text.lstrip()[1:])
    return spoil


DEEP = "[" * 100_000 + "]" * 100_000
FULL = {  # case -> (how to spoil a full checkpoint, words of the rejection)
    "config.json is a FIFO": (fifo_at("config.json"), "config.json is a FIFO, not a regular file"),
    "model.safetensors is a FIFO": (fifo_at("model.safetensors"), "model.safetensors is a FIFO, not a regular file"),
    "a shard is a FIFO": (fifo_at("first shard"), "safetensors is a FIFO, not a regular file"),
    "tokenizer.json is a FIFO": (fifo_at("tokenizer.json"), "tokenizer.json is a FIFO, not a regular file"),
    "trainer_state.json is a FIFO": (fifo_at("trainer_state.json"), "trainer_state.json is a FIFO"),
    "metrics.json is a FIFO": (fifo_at("metrics.json"), "metrics.json is a FIFO"),
    "config.json nested 100000 deep": (config_text("config.json", '{"a": ' + DEEP + "}"), "nests deeper than 64"),
    "config.json with a 5000-digit integer": (config_text("config.json", '{"vocab_size": ' + "9" * 5000 + "}"),
                                              "holds an integer of 5000 digits"),
    "config.json with a key twice": (config_text("config.json", '{"model_type": "llama", "model_type": "bert"}'),
                                     "gives the key 'model_type' twice"),
    "config.json not UTF-8": (config_text("config.json", b'{"model_type": "\xff"}'), "is not UTF-8 text"),
    "trainer_state.json nested 100000 deep": (config_text("trainer_state.json", DEEP), "nests deeper than 64"),
    "trainer_state.json a list": (config_text("trainer_state.json", "[1]"), "is a JSON list, not the object"),
    "metrics.json with a 5000-digit integer": (config_text("metrics.json", '{"loss": ' + "9" * 5000 + "}"),
                                               "holds an integer of 5000 digits"),
    "tokenizer.json with a key twice": (config_text("tokenizer.json", '{"model": 1, "model": 2}'),
                                        "gives the key 'model' twice"),
}
ADAPTER = {
    "adapter_config.json is a FIFO": (fifo_at("adapter_config.json"), "adapter_config.json is a FIFO"),
    "adapter_config.json nested 100000 deep": (_adapter_config_with('"deep": ' + DEEP), "nests deeper than 64"),
    "adapter_config.json with a 5000-digit integer": (_adapter_config_with('"x": ' + "9" * 5000),
                                                      "holds an integer of 5000 digits"),
    "adapter_config.json with a key twice": (_adapter_config_with('"r": 4096'), "gives the key 'r' twice"),
}


def fold_in_a_process(policy: Path, checkpoint: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mergeops", "fold", str(checkpoint), "--policy", str(policy)],
                          capture_output=True, text=True, timeout=FOLD_BOUND)


def assert_rejected_and_nothing_else(policy_path: Path, result: subprocess.CompletedProcess[str], words: str) -> None:
    assert result.returncode == 3, result.stderr
    assert words in result.stderr and "Traceback" not in result.stderr, result.stderr
    policy = load_policy(policy_path)
    with Ledger.open_readonly(policy.home) as ledger:
        rejections = ledger.events()
        assert [e["kind"] for e in rejections] == ["checkpoint.rejected"]
        assert words in json.dumps(rejections[0]["payload"], ensure_ascii=False)
        assert ledger.head("s") is None
    out = policy.stream("s").output
    assert not out.exists() or [p.name for p in out.iterdir()] == [OWNER_FILE]  # no version, only whose it is


@pytest.mark.timeout(FOLD_BOUND + 30)
@pytest.mark.parametrize("case", list(FULL))
def test_a_hostile_file_in_a_checkpoint_is_a_rejection_not_a_hang_or_a_crash(tmp_path, case):
    spoil, words = FULL[case]
    base_path, base = make_base(tmp_path)
    sharded = case == "a shard is a FIFO"
    checkpoint = make_checkpoints(tmp_path, base, 1, shard_bytes=2048 if sharded else None)[0]
    spoil(checkpoint)
    policy = write_policy(tmp_path, base_path, "average")
    assert_rejected_and_nothing_else(policy, fold_in_a_process(policy, checkpoint), words)


@pytest.mark.timeout(FOLD_BOUND + 60)
@pytest.mark.parametrize("case", list(ADAPTER))
def test_a_hostile_adapter_config_is_a_rejection_not_a_hang_or_a_crash(tmp_path, case):
    from tests.adapters import make_adapter, tiny_base

    spoil, words = ADAPTER[case]
    base = tiny_base(tmp_path, "llama")
    adapter = make_adapter(base, tmp_path / "adapter", seed=1, rank=4, alpha=8, targets=["q_proj", "v_proj"])
    spoil(adapter)
    policy = write_policy(tmp_path, base, "task_arithmetic")
    assert_rejected_and_nothing_else(policy, fold_in_a_process(policy, adapter), words)
