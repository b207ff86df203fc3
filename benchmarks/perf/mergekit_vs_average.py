"""mergekit's linear merge of two fine-tunes vs mergeops' `average` folding the same two, side by side in one run.

Not the same job: mergekit's `linear` is a one-shot merge of the models it is given; mergeops' `average` is a
continual fold: each `mergeops fold` validates and digests the checkpoint, updates a float32 running mean (the
state, written to disk), writes the merged model with a model card and provenance, and records a signed ledger
event. So two figures are reported for mergeops: the time for the same final model (fold 1 + fold 2) and the time
per additional checkpoint (fold 2 alone: what the next arrival costs, where mergekit would have to merge every
model again). Each tool runs as a fresh process (times are spawn to exit, imports included; mergeops' time after
its imports is shown too), in the same environment, in alternating order, --repeats times; peak RSS is each
process's own (see perf_common.run_measured), the larger of the two folds for mergeops. Finally the two merged
models are compared tensor by tensor, and each against the exact mean (computed in float32, rounded once to bf16):
mergekit computes in bf16 (dtype: bfloat16), mergeops in float32.

Needs the mergekit virtualenv: benchmarks/perf/setup_mergekit.sh (or --mergekit-venv / $MERGEKIT_VENV). Then:

    python benchmarks/perf/mergekit_vs_average.py --params 200e6 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from perf_common import (
    WORKDIR,
    build,
    ensure_keys,
    largest_tensor_mib,
    markdown,
    mergeops_startup,
    missing_bytes,
    read_files,
    require_disk,
    run_fold,
    run_measured,
    shape_for,
    tensor_files,
    write_json,
    write_policy,
)
from safetensors import safe_open


def mergekit_config(checkpoints: list[Path]) -> str:
    models = "".join(f"  - model: {path}\n    parameters:\n      weight: 0.5\n" for path in checkpoints)
    return f"merge_method: linear\nmodels:\n{models}dtype: bfloat16\n"


def run_mergekit(mergekit: Path, config: Path, out: Path, env: dict[str, str]) -> dict[str, float]:
    shutil.rmtree(out, ignore_errors=True)
    run = run_measured([str(mergekit), str(config), str(out), "--no-copy-tokenizer", "--quiet"], env=env)
    return {"seconds": run.seconds, "peak_rss_mib": run.peak_mib}


def run_ours(home: Path, base: Path, checkpoints: list[Path], signing_key: Path) -> dict[str, Any]:
    policy = write_policy(home, base, "average", {}, signing_key)
    folds = [run_fold(checkpoint, policy) for checkpoint in checkpoints]
    return {"seconds": sum(f.wall for f in folds), "fold_wall_s": [f.wall for f in folds],
            "fold_after_imports_s": [f.seconds for f in folds], "imports_s": [f.imports for f in folds],
            "peak_rss_mib": max(f.peak_mib for f in folds), "fold_peak_rss_mib": [f.peak_mib for f in folds]}


def compare(ours: Path, theirs: Path, checkpoints: list[Path]) -> dict[str, Any]:
    """Max |ours − mergekit| over all tensors, and each tool's distance from the exact mean rounded to bf16."""
    with ExitStack() as stack:
        def opened(folder: Path) -> dict[str, Any]:
            handles = {}
            for path in tensor_files(folder):
                f = stack.enter_context(safe_open(path, framework="pt"))
                handles |= {name: f for name in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
            return handles
        mine, other = opened(ours), opened(theirs)
        inputs = [opened(path) for path in checkpoints]
        diff = {"ours_vs_mergekit": 0.0, "ours_vs_exact": 0.0, "mergekit_vs_exact": 0.0}
        differing, elements, largest = 0, 0, 0.0
        for name in mine:
            a, b = mine[name].get_tensor(name).float(), other[name].get_tensor(name).float()
            exact = sum(f[name].get_tensor(name).float() for f in inputs) / len(inputs)
            exact = exact.to(torch.bfloat16).float()
            diff["ours_vs_mergekit"] = max(diff["ours_vs_mergekit"], float((a - b).abs().max()))
            diff["ours_vs_exact"] = max(diff["ours_vs_exact"], float((a - exact).abs().max()))
            diff["mergekit_vs_exact"] = max(diff["mergekit_vs_exact"], float((b - exact).abs().max()))
            differing += int((a != b).sum())
            elements += a.numel()
            largest = max(largest, float(a.abs().max()))
    return {"max_abs_diff": diff, "elements_differing": differing, "elements": elements,
            "max_abs_value": largest, "only_in_ours": sorted(set(mine) - set(other)),
            "only_in_mergekit": sorted(set(other) - set(mine))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=200e6)
    parser.add_argument("--vocab", type=int, default=0, help="vocabulary size (default: Llama's 32000)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=WORKDIR)
    parser.add_argument("--mergekit-venv", type=Path,
                        default=Path(os.environ.get("MERGEKIT_VENV", "/work/venvs/mergekit")))
    parser.add_argument("--json", type=Path, help="raw numbers (default: WORKDIR/mergekit_vs_average-N.json)")
    args = parser.parse_args()
    mergekit = args.mergekit_venv / "bin" / "mergekit-yaml"
    if not mergekit.exists():
        sys.exit(f"{mergekit} not found: run benchmarks/perf/setup_mergekit.sh first (or pass --mergekit-venv).")
    args.workdir.mkdir(parents=True, exist_ok=True)
    shape = shape_for(args.params, args.vocab)
    # models, then two merged models and our float32 state, each at most twice
    need = missing_bytes(args.workdir, shape, 2) + shape.parameters * (2 + 2 * 2 + 2 * 4)
    require_disk(args.workdir, need, "models and both tools' outputs")
    base, checkpoints = build(args.workdir, shape, 2)
    signing_key = ensure_keys(args.workdir)
    run = args.workdir / f"mergekit-{shape.parameters}"
    run.mkdir(exist_ok=True)
    config = run / "linear.yml"
    config.write_text(mergekit_config(checkpoints))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")  # local folders only; never the Hub
    read_files([p for folder in [base, *checkpoints] for p in tensor_files(folder)])

    mergekit_help, mergeops_help = run_measured([str(mergekit), "--help"], env=env), mergeops_startup()
    startup = {"mergekit": {"seconds": mergekit_help.seconds, "peak_rss_mib": mergekit_help.peak_mib},
               "mergeops": {"seconds": mergeops_help.wall, "peak_rss_mib": mergeops_help.peak_mib}}
    runs: dict[str, list[dict[str, Any]]] = {"mergekit": [], "mergeops": []}
    for repeat in range(args.repeats):
        order = ["mergekit", "mergeops"] if repeat % 2 == 0 else ["mergeops", "mergekit"]
        for tool in order:
            if tool == "mergekit":
                runs[tool].append(run_mergekit(mergekit, config, run / "out-mergekit", env))
            else:
                runs[tool].append(run_ours(run / "home", base, checkpoints, signing_key))
            print(f"repeat {repeat + 1}/{args.repeats} {tool}: {runs[tool][-1]['seconds']:.2f} s, "
                  f"peak RSS {runs[tool][-1]['peak_rss_mib']:.0f} MiB", file=sys.stderr, flush=True)
    agreement = compare((run / "home" / "out" / "latest").resolve(), run / "out-mergekit", checkpoints)
    report(args, shape.parameters, largest_tensor_mib(base), startup, runs, agreement, mergekit)
    raw = {"parameters": shape.parameters, "largest_tensor_f32_mib": largest_tensor_mib(base),
           "torch_threads": torch.get_num_threads(), "repeats": args.repeats,
           "startup": startup,
           "runs": runs, "agreement": agreement}
    write_json(args.json or args.workdir / f"mergekit_vs_average-{shape.parameters}.json", raw)


def report(args: argparse.Namespace, parameters: int, largest: float, startup: dict[str, Any],
           runs: dict[str, list[dict[str, Any]]], agreement: dict[str, Any], mergekit: Path) -> None:
    version = run_measured([str(mergekit.parent / "python"), "-c",
                            "from importlib.metadata import version; print(version('mergekit'))"]).stdout.strip()

    def med(tool: str, key: str, index: int | None = None) -> float:
        return statistics.median(r[key] if index is None else r[key][index] for r in runs[tool])

    mk_s, mk_rss = med("mergekit", "seconds"), med("mergekit", "peak_rss_mib")
    both, second = med("mergeops", "seconds"), med("mergeops", "fold_wall_s", 1)
    second_inner = med("mergeops", "fold_after_imports_s", 1)
    ours_rss = med("mergeops", "peak_rss_mib")
    started = [f"{startup[tool]['seconds']:.2f} / {startup[tool]['peak_rss_mib']:.0f}" for tool in runs]
    print(f"model: Llama-shaped, {parameters / 1e6:.1f}M parameters, bf16; largest tensor {largest:.0f} MiB in "
          f"float32; mergekit {version}; torch threads {torch.get_num_threads()}; medians of {args.repeats} "
          "alternating runs, each tool a fresh process")
    print()
    print(markdown(
        ["", "mergekit linear (one-shot, 2 models)", "mergeops average", "mergeops / mergekit"],
        [["time for the same final model s (spawn to exit)", f"{mk_s:.2f}", f"{both:.2f} (2 folds)",
          f"{both / mk_s:.2f}"],
         ["time per additional checkpoint s (spawn to exit)", f"{mk_s:.2f} (merges all again)",
          f"{second:.2f} (fold 2)", f"{second / mk_s:.2f}"],
         ["  the same, after imports", "—", f"{second_inner:.2f}", "—"],
         ["peak RSS MiB", f"{mk_rss:.0f}", f"{ours_rss:.0f}", f"{ours_rss / mk_rss:.2f}"],
         ["start-up only (`--help`): s / peak RSS MiB",
          *started, "—"]]))
    diff = agreement["max_abs_diff"]
    print()
    print(f"agreement: max |mergeops − mergekit| = {diff['ours_vs_mergekit']:.3g} over all tensors "
          f"(largest |value| {agreement['max_abs_value']:.3g}); {agreement['elements_differing']:,} of "
          f"{agreement['elements']:,} elements differ. Against the exact mean rounded once to bf16: mergeops "
          f"{diff['ours_vs_exact']:.3g}, mergekit {diff['mergekit_vs_exact']:.3g} (it computes in bf16).")
    if agreement["only_in_ours"] or agreement["only_in_mergekit"]:
        print(f"tensor names differ: only in mergeops {agreement['only_in_ours']}, "
              f"only in mergekit {agreement['only_in_mergekit']}")
    print("note: mergekit's linear is a one-shot merge of the given models; mergeops' average is a continual fold "
          "that at every checkpoint also validates and digests it, writes the float32 running mean (state), the "
          "merged model with card and provenance, and a signed ledger record.")


if __name__ == "__main__":
    main()
