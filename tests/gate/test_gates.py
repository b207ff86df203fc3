"""Every gate of SPEC §6 accepts what it should and rejects, with its name, what it should not."""

from __future__ import annotations

import json
import re
import sys
import time

import pytest

from mergeops.keys import generate_keys
from mergeops.ledger import Ledger
from mergeops.model.signing import sign_model_folder
from mergeops.pipeline import fold_checkpoint
from mergeops.policy import load_policy
from tests.conftest import write_model
from tests.fold.streams import CONFIG, make_base, make_checkpoints, write_policy


def policy_with(tmp_path, base_path, gate_toml: str, method: str = "average"):
    path = write_policy(tmp_path, base_path, method)
    with open(path, "a") as f:
        f.write("[streams.s.gate]\n" + gate_toml + "\n")
    return load_policy(path)


def assert_nothing_committed(policy):
    assert not (policy.streams["s"].output / "v0002").exists()
    assert not (policy.home / "streams" / "s" / "state" / "v0002").exists()


def card(path, license_name):
    (path / "README.md").write_text(f"---\nlicense: {license_name}\ntags: [x]\n---\n# a fine-tune\n")


def test_licenses(tmp_path):
    base_path, base = make_base(tmp_path)
    good, other, none = make_checkpoints(tmp_path, base, 3)
    card(good, "apache-2.0")
    card(other, "cc-by-nc-4.0")
    policy = policy_with(tmp_path, base_path, 'licenses = ["apache-2.0", "mit"]')
    assert fold_checkpoint(policy, "s", good).status == "merged"
    rejected = fold_checkpoint(policy, "s", other)
    assert (rejected.status, rejected.gate) == ("rejected", "licenses") and "cc-by-nc-4.0" in rejected.reason
    assert fold_checkpoint(policy, "s", none).gate == "licenses"
    assert_nothing_committed(policy)


def test_require_signature(tmp_path):
    base_path, base = make_base(tmp_path)
    signed, unsigned, tampered, foreign = make_checkpoints(tmp_path, base, 4)
    producer = generate_keys(tmp_path / "producer")
    stranger = generate_keys(tmp_path / "stranger")
    for folder in (signed, tampered):
        sign_model_folder(folder, producer.signing_key)
    sign_model_folder(foreign, stranger.signing_key)
    (tampered / "config.json").write_text("{}")
    policy = policy_with(tmp_path, base_path, f'require_signature = true\ntrusted_keys = ["{producer.public_key}"]')
    result = fold_checkpoint(policy, "s", signed)
    assert result.status == "merged"
    for folder, needle in ((unsigned, "carries no model.sig"), (tampered, "not a valid signature"),
                           (foreign, "not a valid signature")):
        rejected = fold_checkpoint(policy, "s", folder)
        assert (rejected.status, rejected.gate) == ("rejected", "signature") and needle in rejected.reason
    assert_nothing_committed(policy)
    with Ledger.open_readonly(policy.home) as ledger:
        gates = json.loads(ledger.db.execute("SELECT gates FROM versions").fetchone()[0])
    assert f"signature:{producer.fingerprint}" in gates


@pytest.mark.parametrize("method", ["average", "opcm"])  # one-pass and two-pass methods
def test_max_update_ratio(tmp_path, method):
    base_path, base = make_base(tmp_path)
    normal = make_checkpoints(tmp_path, base, 3)
    poisoned = {n: (t * 40 if t.dtype.is_floating_point else t) for n, t in base.items()}
    poisoned_path = write_model(tmp_path / "poisoned", poisoned, config=CONFIG)
    policy = policy_with(tmp_path, base_path, "max_update_ratio = 5.0", method)
    assert fold_checkpoint(policy, "s", normal[0]).status == "merged"
    rejected = fold_checkpoint(policy, "s", poisoned_path)
    assert (rejected.status, rejected.gate) == ("rejected", "max_update_ratio") and "median" in rejected.reason
    assert_nothing_committed(policy)
    assert fold_checkpoint(policy, "s", normal[1]).version == 2


EVAL = """
import json, sys
from pathlib import Path
model = Path(sys.argv[1])
assert (model / "model.safetensors").is_file() and (model / "config.json").is_file()
print("evaluating", file=sys.stderr)
print(json.dumps({"accuracy": float(sys.argv[2]), "note": "text is ignored"}))
"""


@pytest.mark.parametrize(("score", "status"), [(0.9, "merged"), (0.1, "rejected")])
def test_eval_gate_runs_on_the_candidate_and_commits_only_above_the_minimum(tmp_path, score, status):
    base_path, base = make_base(tmp_path)
    checkpoint = make_checkpoints(tmp_path, base, 1)[0]
    script = tmp_path / "eval.py"
    script.write_text(EVAL)
    policy = policy_with(tmp_path, base_path, f'eval = "{sys.executable} {script} {{model}} {score}"\n'
                                              "[streams.s.gate.min]\naccuracy = 0.5")
    result = fold_checkpoint(policy, "s", checkpoint)
    assert result.status == status
    if status == "merged":
        with Ledger.open_readonly(policy.home) as ledger:
            assert json.loads(ledger.db.execute("SELECT eval FROM versions").fetchone()[0]) == {"accuracy": 0.9}
    else:
        assert result.gate == "eval" and "accuracy = 0.1" in result.reason
        assert not (policy.streams["s"].output / "v0001").exists()
        assert not (policy.home / "streams" / "s" / "state" / "v0001").exists()


def test_eval_command_that_fails_is_a_rejection_not_a_crash(tmp_path):
    base_path, base = make_base(tmp_path)
    checkpoint = make_checkpoints(tmp_path, base, 1)[0]
    policy = policy_with(tmp_path, base_path, f'eval = "{sys.executable} -c \'import sys; sys.exit(4)\' {{model}}"')
    result = fold_checkpoint(policy, "s", checkpoint)
    assert (result.status, result.gate) == ("rejected", "eval") and "exited 4" in result.reason


LOSS_BY_NAME = """
import json, sys
from pathlib import Path
name = Path(sys.argv[1]).resolve().name
print(json.dumps({"loss": {"ck0": 1.0, "ck1": 4.0}.get(name, 9.0)}))
"""


def test_the_eval_gate_supplies_the_metrics_a_metric_weighted_method_needs(tmp_path):
    from tests.fold import reference
    from tests.fold.streams import assert_close, read_floats, read_model

    base_path, base = make_base(tmp_path)
    checkpoints = make_checkpoints(tmp_path, base, 2)  # no metrics.json, no trainer_state.json
    script = tmp_path / "loss.py"
    script.write_text(LOSS_BY_NAME)
    path = write_policy(tmp_path, base_path, "mwa", {"metric": "loss"})
    with open(path, "a") as f:
        f.write(f'[streams.s.gate]\neval = "{sys.executable} {script} {{model}}"\n')
    policy = load_policy(path)
    for checkpoint in checkpoints:
        result = fold_checkpoint(policy, "s", checkpoint)
        assert result.status == "merged", result.reason
    expected = reference.weighted_average(base, [read_model(c) for c in checkpoints], [1 / 1.0, 1 / 4.0])
    assert_close(read_floats(result.output), expected)


def test_a_long_eval_keeps_ticking_and_is_killed_when_the_tick_says_stop(tmp_path):
    from mergeops import gate
    from mergeops.policy import GateConfig

    slow = tmp_path / "slow.py"
    slow.write_text("import json, sys, time\ntime.sleep(2.5)\nprint(json.dumps({'score': 1}))\n")
    config = GateConfig(eval=f"{sys.executable} {slow} {{model}}")
    ticks = []
    assert gate.evaluate(config, tmp_path, tick=lambda: ticks.append(1)) == {"score": 1.0}
    assert len(ticks) >= 2  # the daemon's watchdog is pinged while the command runs

    class Stop(Exception):
        pass

    def stop() -> None:
        raise Stop

    started = time.monotonic()
    with pytest.raises(Stop):
        gate.evaluate(config, tmp_path, tick=stop)
    assert time.monotonic() - started < 2.0  # killed, not waited for


def _evaluate(tmp_path, body: str, **config):  # type: ignore[no-untyped-def]
    from mergeops import gate
    from mergeops.policy import GateConfig

    script = tmp_path / "eval_script.py"
    script.write_text("import json, os, subprocess, sys, time\n" + body)
    return gate.evaluate(GateConfig(eval=f"{sys.executable} {script} {{model}}", **config), tmp_path)


@pytest.mark.parametrize(("body", "needle"), [
    ("print(json.dumps({'acc': float('nan')}))", "acc = nan, not a finite number"),
    ("print(json.dumps({'acc': 'high'}))", "acc = 'high', not a finite number"),
    ("print(json.dumps([0.9]))", "a JSON list, not an object"),
    ("sys.stdout.buffer.write(b'\\xff\\xfe{}\\n')", "not UTF-8 text"),
    ("print('done')", "no JSON object of metrics"),
])
def test_eval_output_that_is_not_a_finite_metric_is_a_rejection(tmp_path, body, needle):
    from mergeops.errors import RejectedError
    from mergeops.policy import GateConfig

    with pytest.raises(RejectedError, match=re.escape(needle)) as caught:
        _evaluate(tmp_path, body, min={"acc": 0.5})
    assert caught.value.gate == "eval"
    assert GateConfig().eval_timeout == 3600


@pytest.mark.timeout(60)
def test_a_background_grandchild_holding_stdout_neither_blocks_the_fold_nor_outlives_it(tmp_path):
    import psutil

    pid_file = tmp_path / "grandchild.pid"
    body = (f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
            "print(json.dumps({'acc': 0.9}))\n")
    assert _evaluate(tmp_path, body) == {"acc": 0.9}
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 20  # SIGKILL is delivered asynchronously
    while psutil.pid_exists(grandchild) and psutil.Process(grandchild).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the eval command's background process outlived it"
        time.sleep(0.05)


@pytest.mark.timeout(60)
def test_the_eval_timeout_is_a_policy_key_and_stops_the_command(tmp_path):
    from mergeops.errors import RejectedError

    with pytest.raises(RejectedError, match=r"ran past eval_timeout = 1 s"):
        _evaluate(tmp_path, "time.sleep(30)\nprint(json.dumps({'acc': 1}))", eval_timeout=1.0)


def test_secrets_reach_the_eval_command_only_when_the_policy_passes_them(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    monkeypatch.setenv("MY_API_KEY", "k")
    monkeypatch.setenv("HARMLESS", "1")
    body = "print(json.dumps({k: float(k in os.environ) for k in ('HF_TOKEN', 'MY_API_KEY', 'HARMLESS')}))"
    assert _evaluate(tmp_path, body) == {"HF_TOKEN": 0.0, "MY_API_KEY": 0.0, "HARMLESS": 1.0}
    assert _evaluate(tmp_path, body, eval_env=("HF_TOKEN",)) == {"HF_TOKEN": 1.0, "MY_API_KEY": 0.0, "HARMLESS": 1.0}
