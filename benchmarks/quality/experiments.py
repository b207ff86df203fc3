"""The three experiments, each driving the ``mergeops`` command on the cached fine-tunes:

* continual merging: every method folds the six fine-tunes in a given task order; after the t-th fold the merged
  model is evaluated on task t (for R[t][t]) and, after the last fold, on every task (R[T][·]);
* MWA over the checkpoints of one fine-tuning run, against its last checkpoint and their uniform average;
* MergeLock: one fine-tune is protected (``mergeops protect``), stripped of every mark, and merged with 1, 3 and 5
  others by every method (ours through ``mergeops fold``, mergekit's ``linear`` and ``ties``), against the same
  merges with the unprotected fine-tune; the same with the model an attacker recovers with the public base as
  anchor; and the strength curve: the lock at several strengths, with its function error in float32, float16 and
  bfloat16.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Any

import torch

from benchmarks.quality.attack import distances, recover, strip_marks
from benchmarks.quality.driver import Mergekit, Mergeops, Method, mergekit_config, prune, write_policy
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
    mergekit: Mergekit | None = None  # for the MergeLock experiment's mergekit rows


def merge_sequence(ctx: Context, policy: Path, method: Method, checkpoints: Sequence[Path],
                   tasks_after: Callable[[int], Sequence[str]], allow_protected: bool = False) -> list[dict[str, Any]]:
    """Fold ``checkpoints`` one by one into the method's stream; after fold t evaluate ``tasks_after(t)`` (the
    policies keep one version: each is evaluated right after the fold that makes it)."""
    steps = []
    for t, checkpoint in enumerate(checkpoints, 1):
        result = ctx.mergeops.fold(policy, method.key, checkpoint, allow_protected=allow_protected)
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
BAR = 0.05  # SPEC §8/§9: a merge that includes a protected model keeps at most 5% of its above-chance accuracy
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def chance(ctx: Context) -> dict[str, float]:
    """Accuracy by chance on every task: 1 / its number of classes (the test splits are balanced)."""
    return {name: 1.0 / len(task.classes) for name, task in ctx.evaluator.tasks.items()}


def kept_fraction(accuracy: Mapping[str, float], control: Mapping[str, float], by_chance: Mapping[str, float]
                  ) -> float:
    """mean_t (acc_t − chance_t) / mean_t (control_t − chance_t) over the control's tasks: the share of the
    unprotected merge's above-chance accuracy that the merge keeps."""
    names = list(control)
    return (mean(accuracy[t] - by_chance[t] for t in names) /
            mean(control[t] - by_chance[t] for t in names))


def lock_merges(ctx: Context, folder: Path, variant: str, first: Path, others: Sequence[Path],
                methods: Sequence[Method], mergekit_methods: Sequence[Method], sizes: Sequence[int],
                allow_protected: bool) -> dict[str, dict[str, dict[str, float]]]:
    """{method key: {size: accuracy on every task}} of the merges of ``first`` with the first ``size − 1`` of
    ``others``. Ours: one stream per method folds ``first, *others`` in that order and the merge after fold ``size``
    is evaluated; mergekit: one merge per size."""
    everything = list(ctx.evaluator.tasks)
    checkpoints = [first, *others][:max(sizes)]
    streams = [Method(f"{variant}-{m.key}", m.label, m.method, m.params) for m in methods]
    found: dict[str, dict[str, dict[str, float]]] = {}
    if streams:
        # A stripped protected copy is what a stream's first-update bound exists to refuse; here its merges are the
        # measurement, so the bound is lifted where the protected copy is folded on purpose.
        gate = {"max_base_relative_update": 1e6} if allow_protected else None
        policy = write_policy(folder / variant / "policy.toml", ctx.base, ctx.keys / "signing.pem", streams,
                              gate=gate)
        for method, stream in zip(methods, streams, strict=True):
            ctx.log(f"mergelock: {variant}, {method.label}, sizes {list(sizes)}")
            steps = merge_sequence(ctx, policy, stream, checkpoints, lambda t: everything if t in sizes else [],
                                   allow_protected)
            found[method.key] = {str(size): steps[size - 1]["accuracy"] for size in sizes}
    for method in mergekit_methods:
        if ctx.mergekit is None:
            raise RuntimeError("mergekit rows asked for without mergekit")
        found[method.key] = {}
        for size in sizes:
            ctx.log(f"mergelock: {variant}, {method.label}, size {size}")
            out = ctx.mergekit.merge(mergekit_config(method, checkpoints[:size], ctx.base),
                                     folder / variant / "mergekit" / f"{method.key}-{size}", ctx.base)
            found[method.key][str(size)] = ctx.evaluator.accuracy(out, everything)
            if not ctx.keep_merged:
                shutil.rmtree(out)
    return found


def kept_table(merges: Mapping[str, Mapping[str, Mapping[str, float]]],
               control: Mapping[str, Mapping[str, Mapping[str, float]]], by_chance: Mapping[str, float]
               ) -> dict[str, dict[str, float]]:
    return {key: {size: kept_fraction(acc, control[key][size], by_chance) for size, acc in per_size.items()}
            for key, per_size in merges.items()}


def method_table(methods: Sequence[Method], mergekit_methods: Sequence[Method]) -> dict[str, dict[str, Any]]:
    return {**{m.key: {**m.to_json(), "tool": "mergeops"} for m in methods},
            **{m.key: {**m.to_json(), "tool": "mergekit"} for m in mergekit_methods}}


def mergelock(ctx: Context, order: Sequence[str], methods: Sequence[Method], sizes: Sequence[int],
              mergekit_methods: Sequence[Method] = (), attack_methods: Sequence[Method] = (),
              attack_mergekit: Sequence[Method] = ()) -> dict[str, Any]:
    """Protect the fine-tune of ``order[0]`` (default strength), strip its marks, and merge it with the next
    ``size − 1`` fine-tunes of ``order`` for every size; the control: the same merges with the unprotected
    fine-tune; the attack: the same with the model recovered from the protected one with the base as anchor."""
    missing = {m.key for m in (*attack_methods, *attack_mergekit)} - {m.key for m in (*methods, *mergekit_methods)}
    if missing:
        raise ValueError(f"attack methods {sorted(missing)} have no control: they must be MergeLock methods too")
    victim = order[0]
    folder = ctx.workdir / "mergelock"
    shutil.rmtree(folder, ignore_errors=True)
    original = ctx.finetunes[victim].final
    others = [ctx.finetunes[t].final for t in order[1:]]
    protected, stripped = folder / "protected", folder / "protected-stripped"
    recovered, recovered_stripped = folder / "recovered", folder / "recovered-stripped"
    ctx.log(f"mergelock: protecting the {victim} fine-tune")
    report = ctx.mergeops.protect(original, protected, ctx.keys / "lock.key", ctx.base)
    strip = strip_marks(protected, stripped, trainer_state_from=original)
    ctx.log("mergelock: the anchor attack")
    attack = recover(protected, ctx.base, recovered)
    attack_strip = strip_marks(recovered, recovered_stripped, trainer_state_from=original)
    apart = distances(original, {"protected": stripped, "recovered": recovered_stripped, "base": ctx.base})
    everything = list(ctx.evaluator.tasks)
    alone = {name: ctx.evaluator.accuracy(path, everything)
             for name, path in (("finetune", original), ("protected", stripped), ("recovered", recovered_stripped))}
    merges = {"control": lock_merges(ctx, folder, "control", original, others, methods, mergekit_methods, sizes,
                                     allow_protected=False),
              "protected": lock_merges(ctx, folder, "protected", stripped, others, methods, mergekit_methods, sizes,
                                       allow_protected=True),
              "attacked": lock_merges(ctx, folder, "attacked", recovered_stripped, others, attack_methods,
                                      attack_mergekit, sizes, allow_protected=True)}
    by_chance = chance(ctx)
    kept = {variant: kept_table(merges[variant], merges["control"], by_chance) for variant in ("protected", "attacked")}
    return {"victim": victim, "order": list(order), "sizes": list(sizes), "bar": BAR, "chance": by_chance,
            "methods": method_table(methods, mergekit_methods),
            "attack_methods": method_table(attack_methods, attack_mergekit),
            "mergekit": ctx.mergekit.versions if ctx.mergekit and (mergekit_methods or attack_mergekit) else None,
            "strength": report.get("strength"), "protect_report": report, "stripped": strip, "attack": attack,
            "recovered_stripped": attack_strip, "distances": apart, "alone": alone, "merges": merges, "kept": kept,
            "passed": all(k <= BAR for per_size in kept["protected"].values() for k in per_size.values())}


def function_in(ctx: Context, model: Path, reference: Mapping[str, tuple[dict[str, float], dict[str, torch.Tensor]]]
                ) -> dict[str, Any]:
    """``model`` run in every dtype of ``reference`` (the unprotected fine-tune's accuracy and embeddings in it):
    its accuracy on every task, and the distance of its (unit) embeddings from the reference's."""
    found = {}
    for name, (_, ref_embeddings) in reference.items():
        accuracy, embeddings = ctx.evaluator.run(model, list(ref_embeddings), DTYPES[name])
        errors = torch.cat([(embeddings[t] - ref_embeddings[t]).norm(dim=1) for t in ref_embeddings])
        finite = errors[errors.isfinite()]
        found[name] = {"accuracy": accuracy, "nonfinite_embeddings": int(errors.numel() - finite.numel()),
                       "max_embedding_error": float(finite.max()) if finite.numel() == errors.numel() else None,
                       "mean_embedding_error": float(finite.mean()) if finite.numel() else None}
    return found


def strength_curve(ctx: Context, order: Sequence[str], strengths: Sequence[int], methods: Sequence[Method],
                   sizes: Sequence[int], control: Mapping[str, Mapping[str, Mapping[str, float]]] | None = None,
                   dtypes: Sequence[str] = tuple(DTYPES)) -> dict[str, Any]:
    """For every strength: protect the fine-tune of ``order[0]`` at it, strip the marks, and measure the kept
    fraction of ``methods`` at ``sizes``; with the protect report's function error and headroom, and the protected
    model's accuracy and embedding error against the fine-tune's when both run in float32, float16 and bfloat16.

    ``control``: the unprotected merges ({method key: {size: accuracy}}) when already measured (by ``mergelock``)."""
    victim = order[0]
    folder = ctx.workdir / "strength"
    shutil.rmtree(folder, ignore_errors=True)
    original = ctx.finetunes[victim].final
    others = [ctx.finetunes[t].final for t in order[1:]]
    everything = list(ctx.evaluator.tasks)
    wanted = [str(s) for s in sizes]
    if control is None or any(m.key not in control or any(s not in control[m.key] for s in wanted) for m in methods):
        control = lock_merges(ctx, folder, "control", original, others, methods, (), sizes, allow_protected=False)
    control = {m.key: {s: dict(control[m.key][s]) for s in wanted} for m in methods}
    ctx.log(f"strength curve: the {victim} fine-tune in {', '.join(dtypes)}")
    reference = {name: ctx.evaluator.run(original, everything, DTYPES[name]) for name in dtypes}
    by_chance = chance(ctx)
    points = []
    for strength in strengths:
        here = folder / f"strength-{strength}"
        ctx.log(f"strength curve: protecting the {victim} fine-tune at strength {strength}")
        report = ctx.mergeops.protect(original, here / "protected", ctx.keys / "lock.key", ctx.base, strength)
        stripped = here / "protected-stripped"
        strip_marks(here / "protected", stripped, trainer_state_from=original)
        function = function_in(ctx, stripped, reference)
        merges = lock_merges(ctx, here, f"s{strength}", stripped, others, methods, (), sizes, allow_protected=True)
        forward = (report.get("function_check") or {}).get("forward") or {}
        points.append({"requested": strength, "strength": report.get("strength", strength),
                       "output_digest": report.get("output_digest"), "transformed": report.get("transformed"),
                       "function_error": forward.get("max_relative_error"), "headroom": report.get("headroom"),
                       "residual_risk": (report.get("residual_risk") or {}).get("summary"),
                       "function": function, "merges": merges, "kept": kept_table(merges, control, by_chance)})
        if not ctx.keep_merged:
            shutil.rmtree(here / "protected")
            shutil.rmtree(stripped)
    return {"victim": victim, "order": list(order), "sizes": list(sizes), "bar": BAR, "chance": by_chance,
            "methods": method_table(methods, ()), "control": control,
            "reference": {name: acc for name, (acc, _) in reference.items()}, "points": points}
