#!/usr/bin/env python
"""Benchmark: mergeops' OPCM fold against FusionBench's OPCM on the same Llama-shaped model (SPEC §4, §9).

Run with the python that has mergeops installed; FusionBench runs in its own venv (setup_fusionbench.sh):

    python3 benchmarks/opcm/bench_opcm.py [--params 200e6] [--n 4] [--vocab V] [--workdir DIR]

Generates (cached in --workdir) a float32 base and N fine-tunes (rank-4 update + dense noise per 2-D
tensor, mergeops.synthetic), then merges them in order with
  (a) mergeops: `mergeops fold CKPT --policy P` per checkpoint, each in a fresh process (method opcm,
      alpha 0.5, zero_diagonal true); wall time and VmHWM of each fold process;
  (b) FusionBench: opcm_general.OPCM over the whole sequence in one process (run_fusionbench_opcm.py),
      per-step load and merge time from FusionBench's own profiler sections, VmHWM of the process;
and compares the final merged models tensor by tensor. Prints a markdown report with the commands.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

import mergeops
from mergeops.fold.methods.opcm import OPCM
from mergeops.model import ModelFolder
from mergeops.synthetic import LlamaShape, llama_shape_for, write_base, write_finetune

HERE = Path(__file__).resolve().parent
LLAMA_VOCAB = 32000
# `mergeops fold ...` in-process, then the child's own peak RSS and time in main() on stderr.
FOLD_WRAPPER = (
    "import json, sys, time\n"
    "import torch\n"
    "from pathlib import Path\n"
    "from mergeops.cli import main\n"
    "sys.argv = ['mergeops', *sys.argv[1:]]\n"
    "start = time.perf_counter()\n"
    "try:\n"
    "    main()\n"
    "finally:\n"
    "    hwm = [ln for ln in Path('/proc/self/status').read_text().splitlines() if ln.startswith('VmHWM:')]\n"
    "    print(json.dumps({'vmhwm_kib': int(hwm[0].split()[1]), 'main_s': time.perf_counter() - start,\n"
    "                      'threads': torch.get_num_threads()}), file=sys.stderr)\n"
)


def cmdline(argv: list[str]) -> str:
    return shlex.join(argv if argv[:2] != [sys.executable, "-c"] else [argv[0], "-c", "<FOLD_WRAPPER>", *argv[3:]])


def ensure_models(root: Path, shape: LlamaShape, n: int) -> tuple[Path, list[Path]]:
    """The base and fine-tunes 1..n, generated once per shape (folders appear atomically)."""
    folder = root / f"models-h{shape.hidden}-l{shape.layers}-v{shape.vocab}"
    base = folder / "base"
    if not base.exists():
        print(f"generating {base}", file=sys.stderr)
        write_base(base, shape, seed=0)
    checkpoints = [folder / f"ckpt{i}" for i in range(1, n + 1)]
    for i, checkpoint in enumerate(checkpoints, 1):
        if not checkpoint.exists():
            print(f"generating {checkpoint}", file=sys.stderr)
            write_finetune(base, checkpoint, seed=i)
    return base, checkpoints


def thread_env(threads: int) -> dict[str, str]:
    return os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def run_mergeops(run: Path, base: Path, checkpoints: list[Path], alpha: float, threads: int,
                 zero_diagonal: bool = True) -> dict[str, Any]:
    policy = run / "policy.toml"
    keygen = [sys.executable, "-c", "from mergeops.cli import main; main()", "keygen", "--out", str(run / "keys")]
    subprocess.run(keygen, check=True, capture_output=True)  # the ledger signs every event
    policy.write_text(f'home = "state"\n[keys]\nsigning = "keys/signing.pem"\n[streams.bench]\n'
                      f'base = {json.dumps(str(base))}\nmethod = "opcm"\noutput = "merged"\nkeep = 1\n'
                      f'[streams.bench.params]\nalpha = {alpha}\nzero_diagonal = {json.dumps(zero_diagonal)}\n')
    steps, commands = [], [shlex.join(["mergeops", *keygen[3:]])]
    load = os.getloadavg()[0]
    for t, checkpoint in enumerate(checkpoints, 1):
        argv = [sys.executable, "-c", FOLD_WRAPPER, "fold", str(checkpoint), "--policy", str(policy), "--json"]
        commands.append(cmdline(argv))
        start = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True, env=thread_env(threads))
        wall = time.perf_counter() - start
        if done.returncode != 0 or json.loads(done.stdout)["status"] != "merged":
            raise SystemExit(f"mergeops fold failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        child = json.loads(done.stderr.strip().splitlines()[-1])
        steps.append({"t": t, "wall_s": wall, **child})
        print(f"mergeops fold t={t}: {wall:.2f} s, VmHWM {child['vmhwm_kib'] / 1024:.0f} MiB", file=sys.stderr)
    return {"steps": steps, "commands": commands, "policy": policy.read_text(), "output": run / "merged" / "latest",
            "loadavg": load}


def run_fusionbench(fb_python: str, out: Path, base: Path, checkpoints: list[Path], alpha: float, dtype: str,
                    threads: int) -> dict[str, Any]:
    argv = [fb_python, str(HERE / "run_fusionbench_opcm.py"), "--base", str(base), *map(str, checkpoints),
            "--alpha", str(alpha), "--dtype", dtype, "--out", str(out)]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=thread_env(threads))
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"FusionBench harness failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"FusionBench ({dtype}): run {result['run_s']:.2f} s, process {wall:.2f} s", file=sys.stderr)
    return result | {"command": shlex.join(argv), "process_s": wall, "out": out, "loadavg": load}


def open_weights(stack: ExitStack, path: Path) -> Callable[[str], torch.Tensor]:
    """Tensor reader for a .safetensors file or a model folder."""
    if path.is_file():
        return stack.enter_context(safe_open(str(path), "pt")).get_tensor
    return stack.enter_context(ModelFolder.open(path)).read


def compare(ours: Path, reference: Path, base: Path, projected: OPCM) -> dict[str, Any]:
    """max|ours − ref| per tensor, relative to max|ref − θ0| (the task vector) and to max|ref|."""
    worst: dict[str, Any] = {"tv": (0.0, ""), "w": (0.0, ""), "tv_projected": (0.0, ""), "tv_other": (0.0, "")}
    diff_sq = tv_sq = 0.0
    with ExitStack() as stack:
        theta0 = stack.enter_context(ModelFolder.open(base))
        mine, ref = open_weights(stack, ours), open_weights(stack, reference)
        for name in theta0.tensors:
            b, a, r = theta0.read(name).double(), mine(name).double(), ref(name).double()
            diff, tv = (a - r).abs().max().item(), (r - b).abs().max().item()
            diff_sq += float((a - r).square().sum())
            tv_sq += float((r - b).square().sum())
            rel_tv, rel_w = diff / tv if tv else (float("inf") if diff else 0.0), diff / r.abs().max().item()
            group = "tv_projected" if projected.is_projected(name, tuple(b.shape)) else "tv_other"
            for key, value in (("tv", rel_tv), ("w", rel_w), (group, rel_tv)):
                worst[key] = max(worst[key], (value, name))
    return worst | {"l2": (diff_sq / tv_sq) ** 0.5}


def mergeops_revision() -> str:
    """mergeops version and the git commit of its source tree (+ "dirty" if it has uncommitted changes)."""
    root = Path(mergeops.__file__).resolve().parent.parent
    git = ["git", "-C", str(root)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True).stdout.strip()
    return f"{mergeops.__version__} (git {commit or 'unknown'}{' + uncommitted changes' if dirty else ''})"


def mib(kib: float) -> str:
    return f"{kib / 1024:,.0f} MiB"


def report(args: argparse.Namespace, shape: LlamaShape, ours: dict[str, Any], fb: dict[str, Any],
           diffs: dict[str, dict[str, Any]], total_s: float) -> str:
    later = [s for s in ours["steps"] if s["t"] >= 2]
    our_wall = statistics.mean(s["wall_s"] for s in later)
    our_main = statistics.mean(s["main_s"] for s in later)
    fb_merge = statistics.mean(s["merge_s"] for s in fb["steps"])
    fb_load_merge = statistics.mean(s["load_s"] + s["merge_s"] for s in fb["steps"])
    our_rss, fb_rss = max(s["vmhwm_kib"] for s in ours["steps"]), fb["vmhwm_kib"]
    vocab_note = "" if shape.vocab == LLAMA_VOCAB else (
        f" Vocabulary reduced from Llama's {LLAMA_VOCAB} to {shape.vocab}: FusionBench SVDs lm_head "
        f"[vocab × hidden] with full_matrices=True, so U is vocab × vocab.")
    lines = [
        f"### OPCM fold: mergeops vs FusionBench — {shape.parameters / 1e6:.1f}M parameters, N = {args.n}",
        "",
        f"Model: Llama-shaped float32, hidden {shape.hidden}, {shape.layers} layers, intermediate "
        f"{shape.intermediate}, vocab {shape.vocab}, {shape.parameters:,} parameters "
        f"({shape.parameters * 4 / 2**30:.2f} GiB).{vocab_note} Fine-tunes: base + rank-4 update + dense noise "
        f"(mergeops.synthetic, seeds 1..{args.n}). alpha = {args.alpha}, zero_diagonal = true (stock FusionBench). "
        f"{os.cpu_count()} CPUs; torch threads: FusionBench {fb['threads']}, mergeops "
        f"{ours['steps'][-1]['threads']} (OMP_NUM_THREADS = MKL_NUM_THREADS = {args.threads}); mergeops also "
        "prepares two projections (Gram matrix, eigendecomposition) at once on two worker threads of one torch "
        "thread each (its own parallelism, independent of OMP_NUM_THREADS), FusionBench one tensor at a time. "
        f"fusion-bench {fb['fusion_bench']}, torch {fb['torch']}; mergeops {mergeops_revision()}.",
        "",
        "| step t | mergeops fold: process wall | mergeops: in main() | mergeops VmHWM | "
        "FusionBench: load θ_t | FusionBench: merge | FusionBench: load + merge |",
        "|---|---|---|---|---|---|---|",
    ]
    fb_steps = {s["t"]: s for s in fb["steps"]}
    for s in ours["steps"]:
        f = fb_steps.get(s["t"])
        fb_cells = (f"{f['load_s']:.2f} s | {f['merge_s']:.2f} s | {f['load_s'] + f['merge_s']:.2f} s" if f else
                    f"(base + θ_1: {fb['load_base_and_first_s']:.2f} s) | — | —")
        lines.append(f"| {s['t']} | {s['wall_s']:.2f} s | {s['main_s']:.2f} s | {mib(s['vmhwm_kib'])} | {fb_cells} |")
    lines += [
        "",
        "| summary (t ≥ 2, mean per step) | mergeops | FusionBench | FusionBench / mergeops |",
        "|---|---|---|---|",
        f"| time: mergeops process wall vs FB merge only | {our_wall:.2f} s | {fb_merge:.2f} s | "
        f"**{fb_merge / our_wall:.2f}×** |",
        f"| time: mergeops process wall vs FB load + merge | {our_wall:.2f} s | {fb_load_merge:.2f} s | "
        f"{fb_load_merge / our_wall:.2f}× |",
        f"| time: mergeops in main() vs FB merge only | {our_main:.2f} s | {fb_merge:.2f} s | "
        f"{fb_merge / our_main:.2f}× |",
        f"| peak RSS (VmHWM; mergeops: max over fold processes) | {mib(our_rss)} | {mib(fb_rss)} | "
        f"{fb_rss / our_rss:.2f}× |",
        f"| whole sequence (N = {args.n}): process wall | {sum(s['wall_s'] for s in ours['steps']):.2f} s | "
        f"{fb['process_s']:.2f} s (run() {fb['run_s']:.2f} s) | |",
        "",
        "| final merged model, compared with | max over tensors of max\\|Δ\\| / max\\|ref − θ0\\| | "
        "worst tensor | projected tensors | other tensors | max\\|Δ\\| / max\\|ref\\| | "
        "‖Δ‖₂ / ‖ref − θ0‖₂ (whole model) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, d in diffs.items():
        lines.append(f"| {label} | **{d['tv'][0]:.2e}** | {d['tv'][1]} | {d['tv_projected'][0]:.2e} | "
                     f"{d['tv_other'][0]:.2e} | {d['w'][0]:.2e} | {d['l2']:.2e} |")
    lines += [
        "",
        "What is measured. mergeops: each `mergeops fold` is a fresh process, timed from spawn to exit (imports, "
        "reading base + state + checkpoint, validation, Gram-matrix eigendecompositions and projections, writing "
        "the new state and a complete output folder, digests, signed ledger record); 'in main()' excludes "
        "interpreter start-up and the imports of torch and `mergeops.cli`. "
        "FusionBench: one process for the whole sequence; 'merge' is its own `merging model` profiler section of "
        "step t (task-vector norms, full SVDs and projections, rescaling); 'load θ_t' is its `loading model` "
        "section (safetensors read + module tree). FusionBench writes nothing per step (the harness saves only "
        "the final model once, outside the timings), while mergeops also computes digests and writes state and a "
        "full output folder at every step. Peak RSS: VmHWM from /proc/<pid>/status of each process (FusionBench's "
        f"includes ~{mib(fb['vmhwm_before_run_kib'])} of imports before run()). 1-minute load average when each tool "
        f"started: mergeops {ours['loadavg']:.2f}, FusionBench {fb['loadavg']:.2f}. Whole benchmark: {total_s:.0f} s.",
        "",
        "Commands:",
        "```",
        f"{sys.executable} {shlex.join(sys.argv)}",
        f"# every command below runs with OMP_NUM_THREADS={args.threads} MKL_NUM_THREADS={args.threads}",
        "# policy.toml:",
        *ours["policy"].splitlines(),
        "# mergeops: a signing key once (the ledger signs every event), then one process per checkpoint",
        "# (<FOLD_WRAPPER> = `from mergeops.cli import main; main()` plus a VmHWM print, see bench_opcm.py):",
        *ours["commands"],
        "# FusionBench:",
        fb["command"],
        "```",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=200e6, help="approximate model size (parameters)")
    parser.add_argument("--n", type=int, default=4, help="number of fine-tuned checkpoints")
    parser.add_argument("--vocab", type=int, default=0, help=f"vocabulary size (default: Llama's {LLAMA_VOCAB})")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mergeops-bench-opcm"))
    parser.add_argument("--fb-python", default="/work/venvs/fusionbench/bin/python",
                        help="python of the FusionBench venv")
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP/MKL threads for both tools (default 1: on this 2-vCPU VM two-thread LAPACK calls "
                             "stall at random, up to 20x)")
    parser.add_argument("--fb-float64", action="store_true",
                        help="also run FusionBench in float64 and compare both float32 results with it")
    args = parser.parse_args()
    if args.n < 2:
        parser.error("--n must be at least 2 (step 1 only copies θ_1)")

    begin = time.perf_counter()
    shape = llama_shape_for(int(args.params))
    if args.vocab:
        shape = dataclasses.replace(shape, vocab=args.vocab)
    base, checkpoints = ensure_models(args.workdir, shape, args.n)
    run = args.workdir / f"run-h{shape.hidden}-l{shape.layers}-v{shape.vocab}-n{args.n}"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)

    (run / "mergeops").mkdir()
    ours = run_mergeops(run / "mergeops", base, checkpoints, args.alpha, args.threads)
    fb = run_fusionbench(args.fb_python, run / "fusionbench" / "merged.safetensors", base, checkpoints, args.alpha,
                         "float32", args.threads)
    projected = OPCM(OPCM.check_params({"alpha": args.alpha, "zero_diagonal": True}, "bench"), {})
    diffs = {"mergeops vs FusionBench (float32)": compare(ours["output"], fb["out"], base, projected)}
    if args.fb_float64:
        fb64 = run_fusionbench(args.fb_python, run / "fusionbench64" / "merged.safetensors", base, checkpoints,
                               args.alpha, "float64", args.threads)
        diffs["mergeops vs FusionBench run in float64"] = compare(ours["output"], fb64["out"], base, projected)
        diffs["FusionBench float32 vs FusionBench float64"] = compare(fb["out"], fb64["out"], base, projected)
        fb["command"] += "\n" + fb64["command"]
    print(report(args, shape, ours, fb, diffs, time.perf_counter() - begin))


if __name__ == "__main__":
    main()
