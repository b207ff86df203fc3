"""The README's first command: a small end-to-end run on generated models."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

from mergeops.intake.inspect import inspect_folder
from mergeops.synthetic import LlamaShape, write_base, write_finetune


def run_demo(workdir: Path, checkpoints: int = 3) -> Iterator[str]:
    """Generate a base and ``checkpoints`` fine-tunes into ``workdir/registry`` and inspect each."""
    if workdir.exists():
        shutil.rmtree(workdir)
    shape = LlamaShape()
    base = write_base(workdir / "models" / "base", shape, seed=0)
    yield f"base model: {base} ({shape.parameters:,} parameters)"
    for i in range(1, checkpoints + 1):
        checkpoint = write_finetune(base, workdir / "registry" / "incoming" / f"finetune-{i:03d}", seed=i)
        report = inspect_folder(checkpoint)
        verdict = "ok" if not report.problems else f"{len(report.problems)} problem(s)"
        yield f"checkpoint {checkpoint.name}: {report.digest} {report.parameters:,} parameters, {verdict}"
