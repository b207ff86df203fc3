"""Gates on the checkpoint, before anything is folded: MergeLock protection, license, signature, and the inputs its
merge method needs (training metrics, curvature)."""

from __future__ import annotations

from mergeops.errors import ModelFolderError, RejectedError, UntrustedFileError
from mergeops.fold.methods.ota import curvature_problem
from mergeops.gate.base import Subject
from mergeops.gate.eval import evaluate
from mergeops.intake.validate import protection_marks
from mergeops.model import ModelFolder
from mergeops.model.folder import CURVATURE_FILE
from mergeops.model.readme import read_license
from mergeops.policy import GateConfig


class MergeLockGate:
    """A MergeLock-protected checkpoint would break the merge by design: rejected unless the policy allows it (then
    recorded with the checkpoint)."""

    name = "mergelock"
    phase = "checkpoint"

    def __init__(self, allowed: bool) -> None:
        self.allowed = allowed

    def check(self, subject: Subject) -> str | None:
        marks = protection_marks(subject.checkpoint)
        if marks is None:
            return None
        if not self.allowed:
            raise RejectedError(f"{subject.checkpoint.path} is protected by MergeLock ({marks['scheme']} version "
                                f"{marks.get('version', '?')}), so merging it would break the merged model; ask its "
                                "owner for the unprotected weights.", gate=self.name)
        subject.mergelock = {"scheme": marks["scheme"], "version": marks.get("version"),
                                      "strength": marks.get("strength"), "allowed": True}
        return "mergelock-allowed"


class LicenseGate:
    """The checkpoint's card names a license the policy accepts."""

    name = "licenses"
    phase = "checkpoint"

    def __init__(self, licenses: tuple[str, ...]) -> None:
        self.licenses = licenses

    def check(self, subject: Subject) -> str:
        checkpoint = subject.checkpoint.path
        try:
            found = read_license(checkpoint)
        except UntrustedFileError as exc:
            raise RejectedError(f"{exc}", gate=self.name) from exc
        if found is None:
            raise RejectedError(f"{checkpoint} has no license in its README.md front matter; the policy accepts "
                                f"only {', '.join(self.licenses)}.", gate=self.name)
        if found.lower() not in {x.lower() for x in self.licenses}:
            raise RejectedError(f"{checkpoint} is licensed {found!r}, which the policy does not accept "
                                f"({', '.join(self.licenses)}).", gate=self.name)
        return self.name


class SignatureGate:
    """The checkpoint carries a valid OpenSSF model signature by one of the policy's trusted keys."""

    name = "signature"
    phase = "checkpoint"

    def __init__(self, trusted_keys: tuple) -> None:
        self.trusted_keys = list(trusted_keys)

    def check(self, subject: Subject) -> str:
        from mergeops.model.signing import verify_model_folder  # model_signing takes 0.4 s to import: only when needed

        checkpoint = subject.checkpoint.path
        if not (checkpoint / "model.sig").is_file():
            raise RejectedError(f"{checkpoint} carries no model.sig, and the policy requires a signature by one of "
                                "its trusted_keys.", gate=self.name)
        signer = verify_model_folder(checkpoint, self.trusted_keys)
        if signer is None:
            raise RejectedError(f"{checkpoint}/model.sig is not a valid signature of this folder by any trusted key "
                                "(the files changed after signing, or the signer is not trusted).", gate=self.name)
        return f"signature:{signer}"


class MetricsGate:
    """The checkpoint comes with the positive training metrics its method weights it by (MWA, OTA's multiplier).
    What training did not record, the policy's eval command measures, if it has one."""

    name = "metrics"
    phase = "inputs"

    def __init__(self, needed: tuple[str, ...], config: GateConfig) -> None:
        self.needed, self.config = needed, config

    def check(self, subject: Subject) -> None:
        where = subject.checkpoint.path
        if self.config.eval is not None and any(m not in subject.metrics for m in self.needed):
            subject.metrics |= evaluate(self.config, where, check_minimums=False, tick=subject.tick)
        for metric in self.needed:
            if metric not in subject.metrics:
                raise RejectedError(f"{where} has no {metric!r} metric; add metrics.json ({{\"{metric}\": ...}}) or "
                                    "trainer_state.json to the checkpoint, or pass --metrics FILE.", gate=self.name)
            value = subject.metrics[metric]
            if value <= 0:
                raise RejectedError(f"{where} has {metric} = {value}; metric-weighted merging needs a positive "
                                    f"{metric}.", gate=self.name)


class CurvatureGate:
    """The checkpoint brings its Adam second moments (OTA), one tensor for each floating tensor, of its shape."""

    name = "curvature"
    phase = "inputs"

    def check(self, subject: Subject) -> None:
        folder = subject.checkpoint
        path = folder.path / CURVATURE_FILE
        if not path.is_file():
            raise RejectedError(
                f"{folder.path} has no {CURVATURE_FILE}, which OTA needs (the Adam second moments); create it "
                f"with `mergeops curvature import {folder.path}` from the Trainer's optimizer.pt.", gate=self.name)
        try:
            with ModelFolder.open(folder.path, CURVATURE_FILE) as curvature:
                problem = curvature_problem(subject.base, curvature)
        except ModelFolderError as exc:
            raise RejectedError(f"{path} is unreadable ({exc}); regenerate it with `mergeops curvature import`.",
                                gate=self.name) from exc
        if problem:
            raise RejectedError(problem, gate=self.name)
