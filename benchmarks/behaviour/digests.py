"""Behaviour check for refactorings: fold the same generated checkpoints with every method through the CLI and print
each merged version's digest. Run it from clean exports of two commits and compare the two JSON files.

    git archive OLD | tar -x -C /tmp/old
    cd /tmp/old && PYTHONPATH=. python benchmarks/behaviour/digests.py /tmp/d-old   # the same for NEW, then
    diff /tmp/d-old/digests.json /tmp/d-new/digests.json

Ten streams cover every method and the paths that differ most between them: TIES's model-wide thresholds, OPCM with
and without zero_diagonal, MWA's window expiry and step weights, OTA with Fisher grafting and with a rank-1 curvature,
the mean fallback and a loss multiplier. Four checkpoints each, Llama-shaped, float32 (``mergeops.synthetic``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from mergeops.keys import generate_keys
from mergeops.synthetic import LlamaShape, write_base, write_curvature, write_finetune

STREAMS = {
    "avg": ("average", {}),
    "ta": ("task_arithmetic", {"lambda": 0.4}),
    "ties": ("ties", {"lambda": 0.5, "density": 0.3}),
    "magmax": ("magmax", {}),
    "opcm": ("opcm", {"alpha": 0.5}),
    "opcmz": ("opcm", {"alpha": 0.7, "zero_diagonal": True}),
    "mwa": ("mwa", {"window": 2}),
    "mwas": ("mwa", {"metric": "step", "penalty": 2.0}),
    "ota": ("ota", {"density": 0.5}),
    "otar": ("ota", {"rank1": True, "fallback": "mean", "metric": "loss"}),
}


def main(out: Path) -> None:
    out.mkdir(parents=True)
    generate_keys(out / "keys")
    write_base(out / "base", LlamaShape(), seed=0)
    checkpoints = []
    for i in range(1, 5):
        path = write_finetune(out / "base", out / f"ck{i}", seed=i)
        write_curvature(path, seed=i)
        (path / "metrics.json").write_text(json.dumps({"loss": 0.5 + 0.1 * i, "step": 100 * i}))
        checkpoints.append(path)
    lines = [f'home = "{out}/home"', "[keys]", f'signing = "{out}/keys/signing.pem"']
    for name, (method, params) in STREAMS.items():
        lines += [f"[streams.{name}]", f'base = "{out}/base"', f'method = "{method}"',
                  f'output = "{out}/merged/{name}"', "keep = 10", f"[streams.{name}.params]",
                  *(f"{k} = {json.dumps(v)}" for k, v in params.items())]
    (out / "policy.toml").write_text("\n".join(lines) + "\n")
    digests = {}
    for name in STREAMS:
        for checkpoint in checkpoints:
            run = subprocess.run([sys.executable, "-m", "mergeops", "fold", "--policy", str(out / "policy.toml"),
                                  "--stream", name, str(checkpoint), "--json"], capture_output=True, text=True)
            result = json.loads(run.stdout) if run.stdout.strip() else {"status": f"error: {run.stderr[-300:]}"}
            key = f"{name}/{checkpoint.name}"
            digests[key] = [result["status"], result.get("version"), result.get("output_digest")]
            print(key, *digests[key], flush=True)
    (out / "digests.json").write_text(json.dumps(digests, indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
