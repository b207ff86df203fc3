#!/usr/bin/env python
"""Benchmark: OPCM on LoRA adapters, folded as adapters (factored sums) and as the same updates in full checkpoints.

    PYTHONPATH=. python benchmarks/opcm/bench_lowrank.py [--params 200e6] [--n 4] [--rank 16] [--workdir DIR]

On the Llama-shaped synthetic base of bench_opcm.py (mergeops.synthetic, cached in --workdir) it writes N rank-r LoRA
adapters in PEFT's format (adapter_config.json + adapter_model.safetensors, targets q/k/v/o/up/gate/down of every
layer, random A and B, the update ~2% of each weight's typical magnitude) and, for each, the full checkpoint
θ0 + scale·B·A computed as the fold reads the adapter. Then it folds (a) the adapters and (b) the full checkpoints
with OPCM, each fold a fresh `mergeops fold` process (bench_opcm.run_mergeops), and prints time and peak RSS per
step and the difference of the two final merged models as a markdown report.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench_opcm import compare, ensure_models, mergeops_revision, mib, run_mergeops

from mergeops.fold.methods.opcm import OPCM
from mergeops.model import ModelFolder, ModelWriter, TensorSpec
from mergeops.model.adapter import Adapter
from mergeops.model.finetune import AdapterFineTune
from mergeops.synthetic import ATTENTION_AND_MLP, llama_shape_for, write_adapter

TARGETS = ATTENTION_AND_MLP
RELATIVE_UPDATE = 0.02  # typical |ΔW| over typical |W|


def write_merged_adapter(base: ModelFolder, adapter: Path, out: Path) -> Path:
    """The adapter's update in a full checkpoint: θ0 + scale·B·A in float32, as the fold reads the adapter."""
    with AdapterFineTune(Adapter.open(adapter), base) as view, ModelWriter(
            out, [TensorSpec(n, i.dtype, i.shape) for n, i in base.tensors.items()], donor=base.path) as writer:
        for name in base.tensors:
            writer.write(name, view.read(name).to(base.tensors[name].dtype).reshape(base.tensors[name].shape))
    return out


def ensure_adapters(folder: Path, base: Path, n: int, rank: int) -> tuple[list[Path], list[Path]]:
    """Adapters 1..n of ``base`` and their full checkpoints, generated once (folders appear atomically)."""
    adapters, fulls = [], []
    with ModelFolder.open(base) as model:
        for i in range(1, n + 1):
            adapter, full = folder / f"lora-r{rank}-{i}", folder / f"lora-r{rank}-{i}-merged"
            if not adapter.exists():
                staging = folder / f".staging-{adapter.name}"
                shutil.rmtree(staging, ignore_errors=True)
                write_adapter(base, staging, seed=1000 + i, rank=rank, alpha=2 * rank, targets=TARGETS,
                              scale=RELATIVE_UPDATE)
                staging.rename(adapter)
            if not full.exists():
                write_merged_adapter(model, adapter, full)
            adapters.append(adapter)
            fulls.append(full)
    return adapters, fulls


def report(args: argparse.Namespace, parameters: int, runs: dict[str, dict[str, Any]], diff: dict[str, Any],
           total_s: float) -> str:
    lora, dense = runs["adapters"], runs["full checkpoints"]
    later = {label: [s for s in run["steps"] if s["t"] >= 2] for label, run in runs.items()}
    mean = {label: statistics.mean(s["wall_s"] for s in steps) for label, steps in later.items()}
    in_main = {label: statistics.mean(s["main_s"] for s in steps) for label, steps in later.items()}
    lines = [
        f"### OPCM on rank-{args.rank} LoRA adapters: factored vs dense — {parameters / 1e6:.1f}M parameters, "
        f"N = {args.n}",
        "",
        f"alpha = {args.alpha}, zero_diagonal = {str(args.zero_diagonal).lower()}; adapters target q/k/v/o/up/gate/"
        f"down of every layer (lora_alpha = 2r); torch threads {lora['steps'][-1]['threads']}; {os.cpu_count()} "
        f"CPUs; 1-minute load when each stream started: adapters {lora['loadavg']:.2f}, full checkpoints "
        f"{dense['loadavg']:.2f}, at the end {os.getloadavg()[0]:.2f}; mergeops {mergeops_revision()}.",
        "",
        "| step t | adapters: `mergeops fold` wall | in main() | VmHWM | full checkpoints: `mergeops fold` wall | "
        "in main() | VmHWM |",
        "|---|---|---|---|---|---|---|",
    ]
    for a, f in zip(lora["steps"], dense["steps"], strict=True):
        lines.append(f"| {a['t']} | {a['wall_s']:.2f} s | {a['main_s']:.2f} s | {mib(a['vmhwm_kib'])} | "
                     f"{f['wall_s']:.2f} s | {f['main_s']:.2f} s | {mib(f['vmhwm_kib'])} |")
    lines += [
        "",
        f"Mean per step t ≥ 2: adapters {mean['adapters']:.2f} s, full checkpoints {mean['full checkpoints']:.2f} s: "
        f"**{mean['full checkpoints'] / mean['adapters']:.1f}× faster** (in main(), after the interpreter's start "
        f"and imports: {in_main['adapters']:.2f} s against {in_main['full checkpoints']:.2f} s, "
        f"{in_main['full checkpoints'] / in_main['adapters']:.1f}×). Final merged models, adapters vs full "
        f"checkpoints: max over tensors of max|Δ| / max|full − θ0| **{diff['tv'][0]:.2e}** ({diff['tv'][1]}), "
        f"max|Δ| / max|full| {diff['w'][0]:.2e}, ‖Δ‖₂ / ‖full − θ0‖₂ {diff['l2']:.2e}. Whole benchmark "
        f"{total_s:.0f} s.",
        "",
        "Commands:",
        "```",
        f"{sys.executable} {' '.join(sys.argv)}",
        "# adapters, then full checkpoints; policy.toml of each:",
        *lora["policy"].splitlines(),
        *lora["commands"],
        *dense["commands"],
        "```",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=200e6, help="approximate model size (parameters)")
    parser.add_argument("--n", type=int, default=4, help="number of adapters")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--zero-diagonal", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="OMP/MKL threads (as bench_opcm.py)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mergeops-bench-opcm"))
    args = parser.parse_args()
    begin = time.perf_counter()
    shape = llama_shape_for(int(args.params))
    base, _ = ensure_models(args.workdir, shape, 0)
    adapters, fulls = ensure_adapters(base.parent, base, args.n, args.rank)
    run = args.workdir / f"run-lowrank-h{shape.hidden}-l{shape.layers}-r{args.rank}-n{args.n}"
    shutil.rmtree(run, ignore_errors=True)
    runs = {}
    for label, checkpoints in (("adapters", adapters), ("full checkpoints", fulls)):
        folder = run / label.replace(" ", "-")
        folder.mkdir(parents=True)
        runs[label] = run_mergeops(folder, base, checkpoints, args.alpha, args.threads, args.zero_diagonal)
    projected = OPCM(OPCM.check_params({"alpha": args.alpha}, "bench"), {})
    diff = compare(runs["adapters"]["output"], runs["full checkpoints"]["output"], base, projected)
    print(report(args, shape.parameters, runs, diff, time.perf_counter() - begin))


if __name__ == "__main__":
    main()
