"""The README's first command: the daemon at work on generated models.

It makes keys, a Llama-shaped base and a few fine-tunes of it (the last a LoRA adapter), starts
`mergeops daemon` on the demo policy (OPCM over a local folder registry), drops the checkpoints into
the registry one by one as a producer would (write elsewhere, then rename), waits for each version,
and shows status, lineage and the audit. Everything it writes lives where the demo policy points (``demo-run/``).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from mergeops.daemon.status import status
from mergeops.errors import MergeopsError, PolicyError
from mergeops.keys import generate_keys, public_key_for, signing_key_path
from mergeops.ledger.audit import audit
from mergeops.ledger.lineage import lineage
from mergeops.ledger.store import Ledger
from mergeops.policy import Policy, load_policy
from mergeops.synthetic import LlamaShape, write_adapter, write_base, write_finetune

WAIT_SECONDS = 120


def run_demo(policy_path: Path, checkpoints: int = 3) -> Iterator[str]:
    """Yield a line per step."""
    policy = load_policy(policy_path)
    stream = policy.stream(None)
    if isinstance(stream.base, str) or not stream.watch or stream.watch[0].path is None:
        raise PolicyError(f"{policy_path}: the demo needs a local base and a local watch path.")
    registry = stream.watch[0].path
    key_dir = signing_key_path(policy.keys).parent
    for generated in (stream.base, registry, stream.output, policy.home, key_dir):
        if generated.exists():
            shutil.rmtree(generated)
    made = generate_keys(key_dir)
    yield f"keys: {key_dir} (signing key {made.fingerprint})"
    shape = LlamaShape()
    write_base(stream.base, shape, seed=0)
    yield f"base model: {stream.base} ({shape.parameters:,} parameters, {shape.config()['architectures'][0]})"
    registry.mkdir(parents=True)
    daemon = subprocess.Popen([sys.executable, "-m", "mergeops", "daemon", "--policy", str(policy_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    yield f"daemon: started (pid {daemon.pid}), watching {registry}"
    try:
        for i in range(1, checkpoints + 1):
            adapter = i == checkpoints and i > 1  # the last is a LoRA adapter, as most fine-tunes in registries are
            name = f"{'adapter' if adapter else 'finetune'}-{i:03d}"
            write = write_adapter if adapter else write_finetune
            write(stream.base, registry / f".{name}.partial", seed=i).rename(registry / name)
            yield f"dropped {name}{' (a LoRA adapter)' if adapter else ''} into the registry"
            _wait_for_version(policy, stream.name, i, daemon)
            yield f"  -> {stream.name} version {i} ({stream.method})"
    finally:
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(timeout=30)
    yield f"daemon: stopped with SIGTERM (exit {code})"
    current = status(policy)["streams"][stream.name]
    yield (f"status: {stream.name} latest v{current['latest_version']:04d}, folded {current['folded']}, "
           f"rejected {current['rejected']}, pending {current['pending']}")
    with Ledger.open_readonly(policy.home) as ledger:
        document = lineage(ledger, str(stream.output / "latest"))
        problems = audit(ledger, public_key_for(policy.keys)).problems
    yield f"lineage of {stream.output / 'latest'} ({document['found']['digest']}):"
    for step in document["steps"]:
        checkpoint = step["checkpoint"]
        kind = f", LoRA adapter r={checkpoint['adapter']['r']}" if "adapter" in checkpoint else ""
        yield (f"  v{step['version']:04d} <- {checkpoint['source']} ({checkpoint['digest'][:19]}...{kind}),"
               f" signed by {step['signer'][:19]}...")
    yield f"  base {document['base']['source']} ({document['base']['digest'][:19]}...)"
    yield "audit: intact" if not problems else f"audit: {len(problems)} problem(s), e.g. {problems[0]['message']}"


def _wait_for_version(policy: Policy, stream: str, version: int, daemon: subprocess.Popen) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise MergeopsError(f"the demo daemon exited early: {daemon.stderr.read() if daemon.stderr else ''}")
        if (status(policy)["streams"][stream]["latest_version"] or 0) >= version:
            return
        time.sleep(0.2)
    raise MergeopsError(f"the demo daemon did not fold version {version} within {WAIT_SECONDS} s.")
