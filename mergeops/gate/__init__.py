"""Gates (SPEC §6): the checks a checkpoint must pass, as a list of small objects the policy configures.

Three phases (``base.py``): gates on what the checkpoint is (``checkpoint.py``: MergeLock, license, signature) and on
what it brings for its method (the curvature and the metrics it needs) run before the fold; gates on the candidate
(``update_ratio.py``, ``eval.py``) run on what the fold produced, before anything is committed. Each failure raises
RejectedError naming the gate, so the rejection is recorded with it; each pass may name itself for the version's
record.
"""

from __future__ import annotations

from mergeops.fold.methods.base import MergeMethod
from mergeops.gate.base import PHASES, Gate, Phase, Subject
from mergeops.gate.checkpoint import CurvatureGate, LicenseGate, MergeLockGate, MetricsGate, SignatureGate
from mergeops.gate.eval import EvalGate, evaluate
from mergeops.gate.update_ratio import BaseRelativeUpdateGate, UpdateRatioGate
from mergeops.policy import GateConfig

__all__ = ["PHASES", "Gate", "Phase", "Subject", "evaluate", "gates_for", "run"]

ALWAYS_ON = ("complete", "parses", "matches-base", "finite")  # intake and the fold check these on every checkpoint


def gates_for(config: GateConfig, method: MergeMethod) -> list[Gate]:
    """The gates of a stream, in the order they run."""
    gates: list[Gate] = [MergeLockGate(config.allow_protected)]
    if config.licenses is not None:
        gates.append(LicenseGate(config.licenses))
    if config.require_signature:
        gates.append(SignatureGate(config.trusted_keys))
    if method.needs_curvature:
        gates.append(CurvatureGate())
    if method.metrics_needed():
        gates.append(MetricsGate(method.metrics_needed(), config))
    gates.append(BaseRelativeUpdateGate(config.max_base_relative_update))
    if config.max_update_ratio is not None:
        gates.append(UpdateRatioGate(config.max_update_ratio))
    if config.eval is not None:
        gates.append(EvalGate(config))
    return gates


def run(gates: list[Gate], subject: Subject, phase: Phase) -> list[str]:
    """Check ``subject`` against the gates of one phase, in order; the names of those passed worth recording."""
    passed = (gate.check(subject) for gate in gates if gate.phase == phase)
    return [name for name in passed if name is not None]
