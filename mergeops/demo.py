"""The README's first command: a small end-to-end run on generated models.

It generates a Llama-shaped base and a few fine-tunes of it into a local folder registry (the paths
come from the demo policy), then folds each checkpoint into the policy's stream, as the daemon would.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

from mergeops.errors import PolicyError
from mergeops.fold.engine import fold_checkpoint
from mergeops.keys import generate_keys
from mergeops.ledger.audit import audit
from mergeops.ledger.lineage import lineage
from mergeops.ledger.store import Ledger, public_key_for, signing_key_path
from mergeops.policy import load_policy
from mergeops.synthetic import LlamaShape, write_base, write_finetune


def run_demo(policy_path: Path, checkpoints: int = 3) -> Iterator[str]:
    """Yield a line per step. Everything the demo policy points at is generated anew."""
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
    for i in range(1, checkpoints + 1):
        checkpoint = write_finetune(stream.base, registry / f"finetune-{i:03d}", seed=i)
        result = fold_checkpoint(policy, stream.name, checkpoint)
        yield (f"{checkpoint.name}: {result.status} -> {stream.name} version {result.version} "
               f"({stream.method}) at {result.output}")
    yield f"latest: {stream.output / 'latest'} -> {(stream.output / 'latest').resolve().name}"
    with Ledger.open_readonly(policy.home) as ledger:
        document = lineage(ledger, str(stream.output / "latest"))
        problems = audit(ledger, public_key_for(policy.keys)).problems
    yield f"lineage of {stream.name}@{document['version']}:"
    for step in document["steps"]:
        yield (f"  v{step['version']:04d} <- {step['checkpoint']['source']} ({step['checkpoint']['digest'][:19]}...) "
               f"signed by {step['signer'][:19]}...")
    yield f"  base {document['base']['source']}"
    yield "audit: intact" if not problems else f"audit: {len(problems)} problem(s), e.g. {problems[0]['message']}"
