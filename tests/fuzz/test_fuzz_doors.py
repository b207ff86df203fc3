"""Fuzzing the doors: hostile checkpoints, headers, adapter configs, tokenizer and trainer files and policies each end
as a clean rejection or a clean error, never a crash or a hang; and a daemon fed a registry of them folds the good
checkpoint behind them.

A clean outcome: the fold returns ``rejected`` (recorded in the ledger, the stream unchanged) or, where the damage
left the checkpoint valid, ``merged``; a library call raises only a :class:`MergeopsError` whose message is one line.
Each test's time is bounded by pytest-timeout (a hang fails the run); budget and seed are fixed in conftest.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, seed
from hypothesis import strategies as st

from mergeops.errors import MergeopsError, PolicyError
from mergeops.ledger import Ledger
from mergeops.model import ModelFolder
from mergeops.model.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, Adapter
from mergeops.pipeline import fold_checkpoint
from mergeops.policy import load_policy
from tests.fuzz.conftest import SEED, World, budget
from tests.fuzz.hostile import (
    HOSTILE_JSON_TEXT,
    JSON_VALUES,
    Mutation,
    adapter_configs,
    file_mutations,
    header_mutations,
    trainer_states,
)

pytestmark = [pytest.mark.timeout(900, method="thread")]

# The files of a full checkpoint an attacker can damage; the required ones must never be accepted damaged.
JSON_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "trainer_state.json", "metrics.json",
              "generation_config.json")
REQUIRED = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", ADAPTER_CONFIG,
            ADAPTER_WEIGHTS}
CHECKPOINT_MUTATIONS = st.one_of(
    *(file_mutations(name, json_file=True) for name in JSON_FILES),
    file_mutations("model.safetensors", json_file=False), header_mutations("model.safetensors"),
    file_mutations("README.md", json_file=False),
    trainer_states().map(lambda t: Mutation("trainer_state.json", f"trainer state {t[:80]!r}",
                                            lambda p: p.write_text(t))),
)
ADAPTER_MUTATIONS = st.one_of(
    adapter_configs().map(lambda t: Mutation(ADAPTER_CONFIG, f"config {t[:100]!r}", lambda p: _overwrite(p, t))),
    file_mutations(ADAPTER_CONFIG, json_file=True), file_mutations(ADAPTER_WEIGHTS, json_file=False),
    header_mutations(ADAPTER_WEIGHTS),
)


def _overwrite(path: Path, text: str) -> None:
    path.unlink(missing_ok=True)
    path.write_bytes(text.encode("utf-8", "replace"))


def _damaged(mutation: Mutation) -> bool:
    """Whether the mutation certainly leaves a required file unusable (so the checkpoint must be rejected)."""
    certain = mutation.what.startswith(("a FIFO", "a symlink to /dev/zero", "a symlink to itself", "a folder",
                                        "a dangling symlink", "truncated", "header length"))
    return mutation.file in REQUIRED and certain


def _fold_and_check(world: World, source: Path, mutation: Mutation) -> str:
    """Fold a copy of ``source`` damaged by ``mutation`` into a new stream; assert a clean outcome; return it."""
    with tempfile.TemporaryDirectory(dir=world.root) as scratch:
        folder = world.copy(source, Path(scratch) / "checkpoint")
        mutation(folder)
        policy = load_policy(world.policy(Path(scratch)))
        try:
            result = fold_checkpoint(policy, "s", folder)
        except MergeopsError as exc:  # a clean error is one sentence, never a traceback
            assert str(exc).strip() and "Traceback" not in str(exc), mutation
            outcome, reason = "error", str(exc)
        else:
            outcome, reason = result.status, result.reason
        with Ledger.open_readonly(policy.home) as ledger:
            folded = ledger.versions("s")
            rejections = ledger.rejections("s")
        if outcome == "merged":
            assert not _damaged(mutation), f"{mutation} was folded as version {folded}"
            assert len(folded) == 1
        else:
            assert folded == [], f"{mutation} ended as {outcome} but the stream changed"
            assert outcome in ("rejected", "error"), outcome
        if outcome == "rejected":
            assert [r.reason for r in rejections] == [reason]
        return outcome


@pytest.mark.parametrize("kind", ["finetune", "adapter"])
@budget(50)
@seed(SEED)
@given(data=st.data())
def test_a_damaged_checkpoint_is_rejected_cleanly(world, kind, data):
    """A full checkpoint or an adapter, one of its files damaged: a rejection (or, if the damage left it valid, a
    version); never a crash, a hang, or a damaged required file accepted."""
    mutation = data.draw(CHECKPOINT_MUTATIONS if kind == "finetune" else ADAPTER_MUTATIONS, label="mutation")
    outcome = _fold_and_check(world, getattr(world, kind), mutation)
    assert outcome != "error" or not _damaged(mutation), f"{mutation}: a damaged checkpoint is a rejection"


@budget(150)
@seed(SEED)
@given(mutation=st.one_of(header_mutations("model.safetensors"), file_mutations("model.safetensors",
                                                                                   json_file=False)))
def test_inspecting_a_damaged_weights_file_names_problems_and_never_raises_otherwise(world, mutation):
    with tempfile.TemporaryDirectory(dir=world.root) as scratch:
        folder = world.copy(world.finetune, Path(scratch) / "checkpoint")
        mutation(folder)
        try:
            opened, problems = ModelFolder.scan(folder)
        except MergeopsError:
            return
        if opened is not None:
            opened.close()
        assert all(p.message.strip() for p in problems)
        if _damaged(mutation):
            assert problems, f"{mutation} was read as a model"


@budget(300)
@seed(SEED)
@given(config=adapter_configs())
def test_reading_any_adapter_config_ends_in_settings_or_a_named_problem(world, config):
    with tempfile.TemporaryDirectory(dir=world.root) as scratch:
        folder = world.copy(world.adapter, Path(scratch) / "adapter")
        _overwrite(folder / ADAPTER_CONFIG, config)
        try:
            adapter, problems = Adapter.scan(folder)
        except MergeopsError:
            return
        if adapter is not None:
            adapter.close()
        assert (adapter is None) == bool(problems)
        assert all(ADAPTER_CONFIG in p.message or ADAPTER_WEIGHTS in p.message for p in problems), problems


# -- policies --------------------------------------------------------------------------------------------------------
POLICY_KEYS = {  # where a key lives, and a valid value for it
    "home": '"state"', "keys.signing": '"keys/signing.pem"', "streams.s.base": '"base"',
    "streams.s.method": '"average"', "streams.s.output": '"out"', "streams.s.keep": "2",
    "streams.s.dtype": '"base"', "streams.s.params.alpha": "0.5", "streams.s.gate.max_update_ratio": "5.0",
    "streams.s.gate.eval_timeout": "60", "streams.s.publish.to": '"published"',
}
TOML_VALUES = st.one_of(
    st.sampled_from(['"\\u0000"', '"' + "a" * 5000 + '"', "1" + "0" * 60, "-1", "nan", "inf", "-inf", "1e999",
                     "[" * 3000 + "]" * 3000, "{ a = " * 200 + "1" + " }" * 200, '"../../.."', '"/"', '""', "true",
                     '"hf://"', '"hf://a/b@"', "[1, 2]", "{}", "0", "1e-320"]),
    JSON_VALUES.map(json.dumps),
)


def _policy_text(overrides: dict[str, str]) -> str:
    values = POLICY_KEYS | overrides
    tables: dict[str, list[str]] = {}
    for dotted, value in values.items():
        table, _, key = dotted.rpartition(".")
        tables.setdefault(table, []).append(f"{key} = {value}")
    text = "\n".join(tables.pop("", [])) + "\n"
    return text + "".join(f"[{table}]\n" + "\n".join(lines) + "\n" for table, lines in tables.items())


@budget(300)
@seed(SEED)
@given(overrides=st.dictionaries(st.sampled_from(sorted(POLICY_KEYS)), TOML_VALUES, min_size=1, max_size=3),
       raw=st.one_of(st.none(), HOSTILE_JSON_TEXT, st.binary(max_size=300).map(lambda b: b.decode("latin-1"))))
def test_any_policy_file_loads_or_is_refused_in_one_sentence(world, overrides, raw):
    with tempfile.TemporaryDirectory(dir=world.root) as scratch:
        path = Path(scratch) / "policy.toml"
        path.write_bytes((raw if raw is not None else _policy_text(overrides)).encode("utf-8", "surrogateescape"))
        try:
            policy = load_policy(path)
        except PolicyError as exc:
            assert str(path) in str(exc) or "policy" in str(exc), exc
            assert "\n" not in str(exc).strip(), exc
            return
        for stream in policy.streams.values():  # what loaded is usable: names and paths are plain
            assert "\x00" not in stream.name and "/" not in stream.name
            assert "\x00" not in str(stream.output)


# -- the daemon ------------------------------------------------------------------------------------------------------
@budget(3)
@seed(SEED)
@given(mutations=st.lists(st.one_of(CHECKPOINT_MUTATIONS.map(lambda m: ("finetune", m)),
                                    ADAPTER_MUTATIONS.map(lambda m: ("adapter", m))), min_size=3, max_size=6))
def test_the_daemon_survives_a_registry_of_hostile_folders_and_folds_the_good_one_behind_them(world, mutations):
    with tempfile.TemporaryDirectory(dir=world.root) as scratch:
        root = Path(scratch)
        registry = root / "registry"
        registry.mkdir()
        for i, (kind, mutation) in enumerate(mutations):
            mutation(world.copy(world.finetune if kind == "finetune" else world.adapter, registry / f"h{i}"))
        world.copy(world.finetune, registry / "zz-good")
        policy = world.policy(root, registry=registry)
        done = subprocess.run([sys.executable, "-m", "mergeops", "daemon", "--policy", str(policy), "--once"],
                              capture_output=True, text=True, timeout=600)
        assert "Traceback" not in done.stderr, done.stderr[-3000:]
        events = [json.loads(line) for line in done.stdout.splitlines()]
        failed = [e for e in events if e["event"] in ("failed", "quarantined")]
        assert done.returncode == 0 and not failed, (mutations, failed, done.stderr[-2000:])
        with Ledger.open_readonly(load_policy(policy).home) as ledger:
            sources = [Path(v.source).name for v in ledger.versions("s")]
        assert "zz-good" in sources, (mutations, [e for e in events if e["event"] != "heartbeat"])
