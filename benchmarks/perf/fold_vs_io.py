"""Elementwise folds vs the raw safetensors I/O floor, side by side in one run (SPEC §9).

For a fold at step t ≥ 2 the floor is: read base, checkpoint (and its exp_avg_sq for OTA) and the method state with
plain safetensors into memory, and write the new state and the merged model with plain safetensors and fsync them —
the bytes a fold cannot avoid moving. Files are in the page cache for both as far as memory allows (at 1B parameters
an OTA fold moves ~29 GB, more than the page cache holds; the floor of each fold is measured right before it, on the
same files). Folds are timed twice: in this long-running process, as the daemon runs them (median of --repeats,
steps t = 2 .. repeats + 1), and once as `mergeops fold` in a fresh process at the last step (wall time after
imports; peak RSS is that process's own, see perf_common.run_measured). Memory is touched once before measuring,
because on a VM the first touch of a page costs far more than any later one. Models are generated once into
--workdir and reused (by the other benchmarks in this folder too); above 500M parameters the checkpoints share one
weights file (see perf_common.LINK_ABOVE). OTA's checkpoints are the same checkpoints plus one exp_avg_sq file
(shared, hard-linked); the others fold them without it, so they do not hash a file their floor does not read. It
checks the free disk first: at 1B with OTA it needs ~31 GB (models ~9 GB, two versions of OTA's float32 state ~18
GB).

    python benchmarks/perf/fold_vs_io.py --params 200e6 1e9 --methods average task_arithmetic mwa ota
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from pathlib import Path

import torch
from perf_common import (
    WORKDIR,
    build,
    ensure_keys,
    largest_tensor_mib,
    missing_bytes,
    require_disk,
    run_fold,
    shape_for,
    tensor_files,
    warm_up_memory,
    with_curvature,
    write_json,
    write_policy,
)
from safetensors import safe_open
from safetensors.torch import save_file

from mergeops.allocator import tune_allocator
from mergeops.pipeline import fold_checkpoint
from mergeops.policy import load_policy

PARAMS = {"average": {}, "task_arithmetic": {"lambda": 0.3}, "mwa": {"metric": "loss"}, "ota": {}}
STATE_KINDS = {"average": 1, "task_arithmetic": 1, "mwa": 1, "ota": 2}


def io_floor(inputs: list[Path], outputs_like: list[Path], scratch: Path) -> float:
    """Seconds to read every input file, plus seconds to write (and fsync, as a fold does) files holding the
    same tensors as ``outputs_like``, all with plain safetensors. Preparing the tensors to write is not timed."""
    start = time.perf_counter()
    for path in inputs:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                f.get_tensor(name).clone()  # get_tensor maps the file lazily; clone makes the read happen
    elapsed = time.perf_counter() - start
    for i, path in enumerate(outputs_like):
        with safe_open(path, framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
        target = scratch / f"floor-{i}.safetensors"
        start = time.perf_counter()
        save_file(tensors, target)
        with open(target, "rb+") as written:
            os.fsync(written.fileno())
        elapsed += time.perf_counter() - start
        target.unlink()
    return elapsed


def fold_in_process(checkpoint: Path, policy: Path) -> float:
    """A fold as the daemon runs it: in a long-lived process whose allocator has warmed up."""
    start = time.perf_counter()
    result = fold_checkpoint(load_policy(policy), "s", checkpoint)
    assert result.status == "merged", result.reason
    return time.perf_counter() - start


def main() -> None:
    tune_allocator()  # the same allocator settings as the `mergeops` command, so the floor is as fast as it can be
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, nargs="+", default=[200e6], help="model sizes, one table each")
    parser.add_argument("--vocab", type=int, default=0, help="vocabulary size (default: Llama's 32000)")
    parser.add_argument("--methods", nargs="+", default=list(PARAMS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=WORKDIR)
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    shapes = [shape_for(p, args.vocab) for p in args.params]
    curvature = "ota" in args.methods
    for method in args.methods:  # a stream left by an interrupted run
        shutil.rmtree(args.workdir / f"run-{method}", ignore_errors=True)
    # models are kept for the next run; a method's stream is removed once measured, so only one is on disk
    need = sum(missing_bytes(args.workdir, s, args.repeats + 2, curvature=curvature) for s in shapes)
    need += max(2 * s.parameters * (4 * STATE_KINDS[m] + 2) for s in shapes for m in args.methods)
    require_disk(args.workdir, need, "models and one stream (two versions of state and output)")
    signing_key = ensure_keys(args.workdir)
    warm_up_memory(8)
    results = []
    for shape in shapes:
        base, checkpoints = build(args.workdir, shape, args.repeats + 2)
        ota = with_curvature(args.workdir, shape, checkpoints) if curvature else []
        results.append(measure_size(args, base, checkpoints, ota, signing_key))
    if args.json:
        write_json(args.json, results)


def measure_size(args: argparse.Namespace, base: Path, plain: list[Path], ota: list[Path], signing_key: Path
                 ) -> dict:
    base_bytes = sum(p.stat().st_size for p in tensor_files(base))
    largest = largest_tensor_mib(base)
    linked = " (checkpoints share one weights file, hard-linked)" if plain[-1].name.endswith("-linked") else ""
    print(f"\nmodel: {base.name}, {base_bytes / 2**20:.0f} MiB bf16 per checkpoint, largest tensor {largest:.0f} "
          f"MiB in float32; torch threads {torch.get_num_threads()}{linked}")
    print("| method | fold in a running process s (median) | I/O floor s (median) | ratio | fold as `mergeops fold` "
          "s | its ratio | its peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for method in args.methods:
        home = args.workdir / f"run-{method}"
        policy = write_policy(home, base, method, PARAMS[method], signing_key)
        checkpoints = ota if method == "ota" else plain  # only OTA's checkpoints carry (and hash) exp_avg_sq
        fold_in_process(checkpoints[0], policy)  # t = 1 creates the state; t >= 2 is what is measured
        folds, floors = [], []
        for checkpoint in checkpoints[1:-1]:
            floors.append(floor_for(base, checkpoint, home, method, args.workdir))
            folds.append(fold_in_process(checkpoint, policy))
        # the fresh process folds last, at a step like any later one (t = 2 is the only fold without a spare state)
        cli_floor = floor_for(base, checkpoints[-1], home, method, args.workdir)
        cli = run_fold(checkpoints[-1], policy)
        shutil.rmtree(home)
        fold, floor = statistics.median(folds), statistics.median(floors)
        print(f"| {method} | {fold:.2f} | {floor:.2f} | {fold / floor:.2f} | {cli.seconds:.2f} | "
              f"{cli.seconds / cli_floor:.2f} | {cli.peak_mib:.0f} |", flush=True)
        rows.append({"method": method, "folds_in_process_s": folds, "floors_s": floors, "cli_fold_s": cli.seconds,
                     "cli_floor_s": cli_floor, "cli_peak_rss_mib": cli.peak_mib})
    return {"model": base.name, "parameters": int(base.name.split("-")[1]), "checkpoint_mib": base_bytes / 2**20,
            "largest_tensor_f32_mib": largest, "linked_checkpoints": bool(linked), "methods": rows}


def floor_for(base: Path, checkpoint: Path, home: Path, method: str, scratch: Path) -> float:
    """The I/O floor of folding ``checkpoint`` into the stream's current state."""
    state = sorted((home / "state" / "streams" / "s" / "state").iterdir())[-1]
    inputs = tensor_files(base) + tensor_files(checkpoint) + tensor_files(state)
    if method != "ota":
        inputs = [p for p in inputs if p.name != "exp_avg_sq.safetensors"]
    latest = (home / "out" / "latest").resolve()
    return io_floor(inputs, tensor_files(state) + tensor_files(latest), scratch)


if __name__ == "__main__":
    main()
