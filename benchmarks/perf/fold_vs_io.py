"""Elementwise folds vs the raw safetensors I/O floor, side by side in one run (SPEC §9).

For a fold at step t ≥ 2 the floor is: read base, checkpoint (and its exp_avg_sq for OTA) and the method
state with plain safetensors into memory, and write the new state and the merged model with plain
safetensors and fsync them — the bytes a fold cannot avoid moving. Files are in the page cache for both.
Folds are timed twice: in this long-running process, as the daemon runs them (median of --repeats), and once
as `mergeops fold` in a fresh process (wall time after imports; peak RSS is that process's VmHWM). Memory is
touched once before measuring, because on a VM the first touch of a page costs far more than any later one.

    python benchmarks/perf/fold_vs_io.py --params 200e6 --methods average task_arithmetic mwa ota
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mergeops.allocator import tune_allocator
from mergeops.fold.engine import fold_checkpoint
from mergeops.keys import generate_keys
from mergeops.model import ModelFolder
from mergeops.policy import load_policy
from mergeops.synthetic import llama_shape_for, write_base, write_curvature, write_finetune

PARAMS = {"average": {}, "task_arithmetic": {"lambda": 0.3}, "mwa": {"metric": "loss"}, "ota": {}}
STATE_KINDS = {"average": 1, "task_arithmetic": 1, "mwa": 1, "ota": 2}

_CHILD = """
import sys, time
start = time.perf_counter()
from mergeops.cli import main
imported = time.perf_counter()
try:
    main()
finally:
    hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    sys.stderr.write(f"BENCH {imported - start} {time.perf_counter() - imported} {hwm}\\n")
"""


def build(workdir: Path, params: float, checkpoints: int) -> tuple[Path, list[Path]]:
    shape = llama_shape_for(int(params))
    base = workdir / f"base-{shape.parameters}"
    if not base.exists():
        write_base(base, shape, seed=0, dtype=torch.bfloat16)
    paths = []
    for i in range(1, checkpoints + 1):
        path = workdir / f"ck-{shape.parameters}-{i}"
        if not path.exists():
            write_finetune(base, path, seed=i)
            write_curvature(path, seed=i)
            (path / "metrics.json").write_text(json.dumps({"loss": 1.0 + i / 10, "step": 100 * i}))
        paths.append(path)
    return base, paths


def tensor_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


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


def run_fold(checkpoint: Path, policy: Path) -> tuple[float, float, float]:
    result = subprocess.run([sys.executable, "-c", _CHILD, "fold", str(checkpoint), "--policy", str(policy),
                             "--json"], capture_output=True, text=True, check=True)
    line = next(x for x in result.stderr.splitlines() if x.startswith("BENCH "))
    imported, folded, hwm_kib = (float(x) for x in line.split()[1:])
    return folded, hwm_kib / 1024, imported


def warm_up_memory(gib: int) -> None:
    """Touch memory once: on a VM the first touch of a physical page is far slower than any later one."""
    block = torch.empty(gib << 28, dtype=torch.float32)  # gib GiB
    block.fill_(1.0)
    del block


def fold_in_process(checkpoint: Path, policy: Path) -> float:
    """A fold as the daemon runs it: in a long-lived process whose allocator has warmed up."""
    start = time.perf_counter()
    result = fold_checkpoint(load_policy(policy), "s", checkpoint)
    assert result.status == "merged", result.reason
    return time.perf_counter() - start


def main() -> None:
    tune_allocator()  # the same allocator settings as the `mergeops` command, so the floor is as fast as it can be
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=200e6)
    parser.add_argument("--methods", nargs="+", default=list(PARAMS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mergeops-bench-fold"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    base, checkpoints = build(args.workdir, args.params, args.repeats + 2)
    if not (args.workdir / "keys").exists():
        generate_keys(args.workdir / "keys")
    signing_key = args.workdir / "keys" / "signing.pem"
    warm_up_memory(8)
    base_bytes = sum(p.stat().st_size for p in tensor_files(base))
    with ModelFolder.open(base) as model:
        largest = max(info.numel for info in model.tensors.values()) * 4 / 2**20
    print(f"model: {base.name}, {base_bytes / 2**20:.0f} MiB bf16 per checkpoint, largest tensor {largest:.0f} MiB "
          f"in float32; torch threads {torch.get_num_threads()}")
    print("| method | fold in a running process s (median) | I/O floor s (median) | ratio | fold as `mergeops fold` "
          "s | its ratio | its peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for method in args.methods:
        home = args.workdir / f"run-{method}"
        subprocess.run(["rm", "-rf", str(home)], check=True)
        home.mkdir()
        params = "\n".join(f"{k} = {json.dumps(v)}" for k, v in PARAMS[method].items())
        policy = home / "policy.toml"
        policy.write_text(f'home = "state"\n[keys]\nsigning = "{signing_key}"\n[streams.s]\nbase = "{base}"\n'
                          f'method = "{method}"\noutput = "out"\nkeep = 1\n[streams.s.params]\n{params}\n')
        fold_in_process(checkpoints[0], policy)  # t = 1 creates the state; t >= 2 is what is measured
        cli_seconds, cli_peak, _ = run_fold(checkpoints[1], policy)
        cli_floor = floor_for(base, checkpoints[1], home, method, args.workdir)
        folds, floors = [], []
        for checkpoint in checkpoints[2:]:
            floors.append(floor_for(base, checkpoint, home, method, args.workdir))
            folds.append(fold_in_process(checkpoint, policy))
        fold, floor = statistics.median(folds), statistics.median(floors)
        print(f"| {method} | {fold:.2f} | {floor:.2f} | {fold / floor:.2f} | {cli_seconds:.2f} | "
              f"{cli_seconds / cli_floor:.2f} | {cli_peak:.0f} |")


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
