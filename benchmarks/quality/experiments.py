"""The three experiments, each driving the ``mergeops`` command on the cached fine-tunes:

* continual merging: every method folds the six fine-tunes in a given task order; after the t-th fold the merged
  model is evaluated on task t (for R[t][t]) and, after the last fold, on every task (R[T][·]);
* MWA over the checkpoints of one fine-tuning run, against its last checkpoint and their uniform average;
* MergeLock: one fine-tune is protected (``mergeops protect``) and merged with the others; then the same with the
  model an attacker recovers from the protected one with the public base as anchor.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Any

import torch

from benchmarks.quality.attack import write_attacked
from benchmarks.quality.driver import Mergeops, Method, prune, write_policy
from benchmarks.quality.encoder import Evaluator
from benchmarks.quality.finetune import FineTune
from mergeops.model import ModelFolder


@dataclass
class Context:
    base: Path
    finetunes: dict[str, FineTune]
    evaluator: Evaluator
    mergeops: Mergeops
    keys: Path  # holds signing.pem and lock.key (`mergeops keygen`)
    workdir: Path
    full_matrix: bool  # evaluate every task seen so far after every fold (default: only what ACC and BWT need)
    keep_merged: bool  # keep merged versions and method state on disk after a stream is done
    log: Callable[[str], None]


def merge_sequence(ctx: Context, policy: Path, method: Method, checkpoints: Sequence[Path],
                   tasks_after: Callable[[int], Sequence[str]]) -> list[dict[str, Any]]:
    """Fold ``checkpoints`` one by one into the method's stream; after fold t evaluate ``tasks_after(t)``."""
    steps = []
    for t, checkpoint in enumerate(checkpoints, 1):
        result = ctx.mergeops.fold(policy, method.key, checkpoint)
        names = tasks_after(t)
        accuracy = ctx.evaluator.accuracy(Path(result["output"]), names) if names else {}
        steps.append({"version": result["version"], "checkpoint": str(checkpoint), "accuracy": accuracy,
                      "output_digest": result["output_digest"]})
    if not ctx.keep_merged:
        prune(policy.parent, method.key)
    return steps


def at_end(count: int, names: Sequence[str]) -> Callable[[int], Sequence[str]]:
    """Evaluate ``names`` after the last of ``count`` folds only."""
    return lambda t: names if t == count else []


# -- task vectors --------------------------------------------------------------------------------------------------
def task_vector_geometry(base: Path, checkpoints: dict[str, Path]) -> dict[str, Any]:
    """Norms and pairwise cosines of the task vectors τ = θ − θ0 over all floating tensors, read one tensor at a
    time; ``sum_norm_ratio`` = ‖Σ τ‖ / mean ‖τ‖ (√T when they are orthogonal and of equal norm; OPCM without any
    projection would merge θ0 + Σ τ / that ratio)."""
    names = list(checkpoints)
    gram = torch.zeros(len(names), len(names), dtype=torch.float64)
    with ExitStack() as stack:
        folder = stack.enter_context(ModelFolder.open(base))
        tuned = [stack.enter_context(ModelFolder.open(checkpoints[n])) for n in names]
        for tensor, info in folder.tensors.items():
            if info.dtype.is_floating_point:
                theta0 = folder.read(tensor).double().flatten()
                taus = torch.stack([f.read(tensor).double().flatten() - theta0 for f in tuned])
                gram += taus @ taus.T
    norms = gram.diagonal().sqrt()
    cosine = gram / torch.outer(norms, norms)
    pairs = [float(cosine[i, j]) for i in range(len(names)) for j in range(i + 1, len(names))]
    return {"norms": {n: float(norms[i]) for i, n in enumerate(names)},
            "cosine": {a: {b: float(cosine[i, j]) for j, b in enumerate(names)} for i, a in enumerate(names)},
            "mean_cosine": mean(pairs) if pairs else 1.0, "max_abs_cosine": max(map(abs, pairs), default=1.0),
            "sum_norm_ratio": float(gram.sum().sqrt() / norms.mean())}


# -- continual merging ---------------------------------------------------------------------------------------------
def continual_metrics(order: Sequence[str], rows: Sequence[dict[str, float]]) -> dict[str, Any]:
    """Average accuracy after all T tasks, and BWT = mean_{i<T} (R[T][i] − R[i][i]) (Lopez-Paz & Ranzato 2017)."""
    final = rows[-1]
    diagonal = {task: rows[i][task] for i, task in enumerate(order)}
    return {"final": final, "diagonal": diagonal, "avg_acc": mean(final[t] for t in order),
            "bwt": mean(final[t] - diagonal[t] for t in order[:-1]) if len(order) > 1 else 0.0}


def continual(ctx: Context, index: int, order: Sequence[str], methods: Sequence[Method]) -> dict[str, Any]:
    folder = ctx.workdir / "continual" / f"order-{index}"
    policy = write_policy(folder / "policy.toml", ctx.base, ctx.keys / "signing.pem", methods)
    found = {}
    for method in methods:
        ctx.log(f"order {index}: {method.label}")

        def tasks_after(t: int) -> list[str]:
            return list(order[:t]) if ctx.full_matrix or t == len(order) else [order[t - 1]]

        steps = merge_sequence(ctx, policy, method, [ctx.finetunes[t].final for t in order], tasks_after)
        rows = [s["accuracy"] for s in steps]
        found[method.key] = {**method.to_json(), "R": rows, **continual_metrics(order, rows),
                             "output_digests": [s["output_digest"] for s in steps]}
    return {"order": list(order), "policy": str(policy), "methods": found}


# -- MWA over the checkpoints of one run --------------------------------------------------------------------------
def mwa(ctx: Context, task: str, methods: Sequence[Method]) -> dict[str, Any]:
    """Merge the checkpoints of ``task``'s run in step order; evaluate each merge and each checkpoint on all tasks."""
    run = ctx.finetunes[task]
    folder = ctx.workdir / "mwa"
    policy = write_policy(folder / "policy.toml", ctx.base, ctx.keys / "signing.pem", methods)
    everything = list(ctx.evaluator.tasks)
    checkpoints = [{**c, "accuracy": ctx.evaluator.accuracy(path, everything)}
                   for c, path in zip(run.manifest["checkpoints"], run.checkpoints, strict=True)]
    merges = {}
    for method in methods:
        ctx.log(f"mwa: {method.label}")
        steps = merge_sequence(ctx, policy, method, run.checkpoints, at_end(len(run.checkpoints), everything))
        merges[method.key] = {**method.to_json(), "accuracy": steps[-1]["accuracy"]}
    return {"task": task, "policy": str(policy), "checkpoints": checkpoints, "merges": merges}


# -- MergeLock -----------------------------------------------------------------------------------------------------
def mergelock(ctx: Context, order: Sequence[str], methods: Sequence[Method]) -> dict[str, Any]:
    """Protect the fine-tune of ``order[0]``, merge it with the others in ``order``; the same after the anchor attack.

    The unprotected control is the continual experiment's run of the same order and methods."""
    victim = order[0]
    folder = ctx.workdir / "mergelock"
    shutil.rmtree(folder, ignore_errors=True)
    original = ctx.finetunes[victim].final
    protected, attacked = folder / "protected", folder / "attacked"
    ctx.log(f"mergelock: protecting the {victim} fine-tune")
    report = ctx.mergeops.protect(original, protected, ctx.keys / "lock.key", ctx.base)
    attack = write_attacked(protected, ctx.base, attacked, original)
    everything = list(ctx.evaluator.tasks)
    alone = {name: ctx.evaluator.accuracy(path, everything)
             for name, path in (("finetune", original), ("protected", protected), ("attacked", attacked))}
    variants: dict[str, Any] = {}
    for variant, model in (("protected", protected), ("attacked", attacked)):
        streams = [Method(f"{variant}-{m.key}", m.label, m.method, m.params) for m in methods]
        policy = write_policy(folder / variant / "policy.toml", ctx.base, ctx.keys / "signing.pem", streams)
        checkpoints = [model, *(ctx.finetunes[t].final for t in order[1:])]
        variants[variant] = {}
        for method, stream in zip(methods, streams, strict=True):
            ctx.log(f"mergelock: {variant} + others, {method.label}")
            steps = merge_sequence(ctx, policy, stream, checkpoints, at_end(len(checkpoints), everything))
            variants[variant][method.key] = {**method.to_json(), "accuracy": steps[-1]["accuracy"]}
    return {"victim": victim, "order": list(order), "protect_report": report, "attack": attack, "alone": alone,
            "merged": variants}
