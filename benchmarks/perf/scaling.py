"""How fold time and peak memory grow with the model's size, and that they do not grow with the number of folds.

(a) Model size: for each --params (Llama-shaped, bf16), a fresh stream folds one checkpoint (t = 1, not
measured), then --repeats more, each as a fresh `mergeops fold` process: fold time after imports (median), wall
time from spawn to exit, and the process's peak RSS (its own; largest of the repeats), set against the
largest tensor in float32 (what a fold computes in) and against the start-up RSS of `mergeops --help`.
`average` at every size; OPCM too up to --opcm-max-params (with one thread: multi-threaded LAPACK stalls at
random on this machine). A log-log fit gives the exponents: time should grow like the model (≈1), peak RSS like
the largest tensor, not the model.
(b) Number of checkpoints: one stream per --steps-methods (default `average`) at --steps-params folds --steps
distinct checkpoints, each a fresh `mergeops fold` process; per-step time and peak RSS, and the least-squares
slope per step over steps 2..K (step 1 reads no state), which should be ~0.

Markdown tables on stdout, raw numbers in --json. Models are generated once into --workdir and shared with the
other benchmarks in this folder; the free disk is checked first (~30 GB with the defaults: the 1B model and its
checkpoints share weights, see perf_common.LINK_ABOVE, plus 20 distinct 200M checkpoints).

    python benchmarks/perf/scaling.py --params 40e6 120e6 240e6 1e9 --steps 20 --steps-params 200e6
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
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
    require_disk,
    run_fold,
    shape_for,
    slope,
    tensor_files,
    write_json,
    write_policy,
)

from mergeops.synthetic import LlamaShape

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def fold_series(home: Path, base: Path, checkpoints: list[Path], method: str, signing_key: Path,
                env: dict[str, str] | None = None) -> list[dict[str, float]]:
    """Fold ``checkpoints`` in order into a fresh stream, each as its own `mergeops fold` process."""
    policy = write_policy(home, base, method, {}, signing_key)
    steps = []
    for checkpoint in checkpoints:
        run = run_fold(checkpoint, policy, env=env)
        steps.append({"seconds": run.seconds, "wall": run.wall, "peak_rss_mib": run.peak_mib})
        print(f"  {method} {checkpoint.name}: {run.seconds:.2f} s after imports, {run.wall:.2f} s wall, "
              f"peak RSS {run.peak_mib:.0f} MiB", file=sys.stderr, flush=True)
    shutil.rmtree(home)
    return steps


def by_size(args: argparse.Namespace, shapes: list[LlamaShape], signing_key: Path, startup_mib: float
            ) -> list[dict[str, Any]]:
    rows = []
    for shape in shapes:
        base, checkpoints = build(args.workdir, shape, args.repeats + 1)
        largest = largest_tensor_mib(base)
        checkpoint_mib = sum(p.stat().st_size for p in tensor_files(base)) / 2**20
        methods = ["average"] + (["opcm"] if shape.parameters <= args.opcm_max_params else [])
        for method in methods:
            env = dict(os.environ, **ONE_THREAD) if method == "opcm" else None
            steps = fold_series(args.workdir / f"scaling-{method}", base, checkpoints, method, signing_key, env)
            measured = steps[1:]  # t >= 2: base, checkpoint and state in, state and merged model out
            peak = max(s["peak_rss_mib"] for s in measured)
            rows.append({"parameters": shape.parameters, "checkpoint_mib": checkpoint_mib,
                         "largest_tensor_f32_mib": largest, "method": method,
                         "seconds": statistics.median(s["seconds"] for s in measured),
                         "wall": statistics.median(s["wall"] for s in measured), "peak_rss_mib": peak,
                         "rss_over_largest": peak / largest, "rss_above_startup_over_largest":
                             (peak - startup_mib) / largest, "steps": steps})
    print(f"\n### Model size (fresh `mergeops fold` per fold, t ≥ 2, median of {args.repeats}; peak = largest; "
          f"start-up RSS of `mergeops --help` {startup_mib:.0f} MiB)\n")
    print(markdown(
        ["parameters", "MiB per checkpoint (bf16)", "largest tensor MiB (f32)", "method", "fold s (after imports)",
         "s per GiB of checkpoint", "wall s", "peak RSS MiB", "RSS / largest", "(RSS − start-up) / largest"],
        [[f"{r['parameters'] / 1e6:.1f}M", f"{r['checkpoint_mib']:.0f}", f"{r['largest_tensor_f32_mib']:.0f}",
          r["method"], f"{r['seconds']:.2f}", f"{r['seconds'] / (r['checkpoint_mib'] / 1024):.2f}",
          f"{r['wall']:.2f}", f"{r['peak_rss_mib']:.0f}", f"{r['rss_over_largest']:.1f}",
          f"{r['rss_above_startup_over_largest']:.1f}"] for r in rows]))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        if len(mine) < 2:
            continue
        logp = [math.log(r["parameters"]) for r in mine]
        print(f"\n{method}: fold time ∝ parameters^{slope(logp, [math.log(r['seconds']) for r in mine]):.2f}, "
              f"peak RSS ∝ parameters^{slope(logp, [math.log(r['peak_rss_mib']) for r in mine]):.2f}, "
              f"largest tensor ∝ parameters^{slope(logp, [math.log(r['largest_tensor_f32_mib']) for r in mine]):.2f}"
              f" (log-log least squares over {len(mine)} sizes)")
    return rows


def by_steps(args: argparse.Namespace, signing_key: Path) -> dict[str, Any]:
    shape = shape_for(args.steps_params, args.vocab)
    base, checkpoints = build(args.workdir, shape, args.steps, linked=False)
    results: dict[str, Any] = {"parameters": shape.parameters}
    for method in args.steps_methods:
        env = dict(os.environ, **ONE_THREAD) if method == "opcm" else None
        steps = fold_series(args.workdir / f"scaling-steps-{method}", base, checkpoints, method, signing_key, env)
        print(f"\n### Number of checkpoints (one `{method}` stream, {shape.parameters / 1e6:.1f}M parameters, "
              f"{args.steps} distinct checkpoints, each fold a fresh `mergeops fold`)\n")
        print(markdown(["step", "fold s (after imports)", "wall s", "peak RSS MiB"],
                       [[k, f"{s['seconds']:.2f}", f"{s['wall']:.2f}", f"{s['peak_rss_mib']:.0f}"]
                        for k, s in enumerate(steps, 1)]))
        result: dict[str, Any] = {"steps": steps}
        later = list(range(2, len(steps) + 1))
        if len(later) >= 2:
            print()
            for key, unit in (("seconds", "s"), ("peak_rss_mib", "MiB")):
                values = [s[key] for s in steps[1:]]
                per_step = slope(later, values)
                change = per_step * (later[-1] - later[0]) / statistics.median(values)
                result[f"{key}_slope_per_step"] = per_step
                result[f"{key}_fitted_change_over_run"] = change
                print(f"{method} {key}: slope {per_step:+.4f} {unit} per step over steps 2..{later[-1]} (median "
                      f"{statistics.median(values):.2f} {unit}; the fit changes by {change:+.1%} from step 2 to "
                      f"{later[-1]})")
        results[method] = result
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, nargs="+", default=[40e6, 120e6, 240e6, 1e9],
                        help="model sizes for (a); each becomes the nearest Llama-like shape")
    parser.add_argument("--vocab", type=int, default=0, help="vocabulary size (default: Llama's 32000)")
    parser.add_argument("--repeats", type=int, default=3, help="measured folds per size and method")
    parser.add_argument("--opcm-max-params", type=float, default=130e6, help="OPCM too up to this size (0: never)")
    parser.add_argument("--steps", type=int, default=20, help="checkpoints folded in (b)")
    parser.add_argument("--steps-params", type=float, default=200e6, help="model size for (b)")
    parser.add_argument("--steps-methods", nargs="+", default=["average"], choices=["average", "opcm"],
                        help="methods for (b)")
    parser.add_argument("--parts", nargs="+", choices=["sizes", "steps"], default=["sizes", "steps"])
    parser.add_argument("--workdir", type=Path, default=WORKDIR)
    parser.add_argument("--json", type=Path, help="raw numbers (default: WORKDIR/scaling.json)")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    shapes = sorted({shape_for(p, args.vocab) for p in args.params}, key=lambda s: s.parameters)
    for left in args.workdir.glob("scaling-*"):  # streams left by an interrupted run
        shutil.rmtree(left)
    need, stream = 0, 0  # models are kept; one stream at a time: two versions of float32 state and bf16 output
    if "sizes" in args.parts:
        need += sum(missing_bytes(args.workdir, s, args.repeats + 1) for s in shapes)
        stream = max(s.parameters * 2 * (4 + 2) for s in shapes)
    if "steps" in args.parts:
        steps_shape = shape_for(args.steps_params, args.vocab)
        need += missing_bytes(args.workdir, steps_shape, args.steps, linked=False)
        stream = max(stream, steps_shape.parameters * 2 * (4 + 2))
    require_disk(args.workdir, need + stream, "models and one stream")
    signing_key = ensure_keys(args.workdir)
    startup = mergeops_startup()
    print(f"torch threads {torch.get_num_threads()}; `mergeops --help`: {startup.wall:.2f} s, peak RSS "
          f"{startup.peak_mib:.0f} MiB")
    raw: dict[str, Any] = {"torch_threads": torch.get_num_threads(),
                           "startup": {"seconds": startup.wall, "peak_rss_mib": startup.peak_mib}}
    if "sizes" in args.parts:
        raw["sizes"] = by_size(args, shapes, signing_key, startup.peak_mib)
    if "steps" in args.parts:
        raw["steps"] = by_steps(args, signing_key)
    write_json(args.json or args.workdir / "scaling.json", raw)


if __name__ == "__main__":
    main()
