"""Gates (SPEC §6): the policy's checks on a checkpoint beyond the always-on validation.

``before_fold`` runs on the checkpoint (license, signature); ``check_update`` on its task-vector
norm measured during the fold; ``evaluate`` on the candidate merged model before it is committed.
Each failure raises RejectedError naming the gate, so the rejection is recorded with it.
"""

from __future__ import annotations

import json
import shlex
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from mergeops.daemon.systemd import child_environment
from mergeops.errors import RejectedError
from mergeops.ledger.card import read_license
from mergeops.policy import GateConfig

EVAL_TIMEOUT_SECONDS = 3600


def before_fold(config: GateConfig, checkpoint: Path) -> list[str]:
    """License and signature gates; returns the names of the gates passed."""
    passed = []
    if config.licenses is not None:
        found = read_license(checkpoint)
        if found is None:
            raise RejectedError(f"{checkpoint} has no license in its README.md front matter; the policy accepts "
                                f"only {', '.join(config.licenses)}.", gate="licenses")
        if found.lower() not in {x.lower() for x in config.licenses}:
            raise RejectedError(f"{checkpoint} is licensed {found!r}, which the policy does not accept "
                                f"({', '.join(config.licenses)}).", gate="licenses")
        passed.append("licenses")
    if config.require_signature:
        from mergeops.publish.signing import verify_model_folder

        if not (checkpoint / "model.sig").is_file():
            raise RejectedError(f"{checkpoint} carries no model.sig, and the policy requires a signature by one of "
                                "its trusted_keys.", gate="signature")
        signer = verify_model_folder(checkpoint, list(config.trusted_keys))
        if signer is None:
            raise RejectedError(f"{checkpoint}/model.sig is not a valid signature of this folder by any trusted key "
                                "(the files changed after signing, or the signer is not trusted).", gate="signature")
        passed.append(f"signature:{signer}")
    return passed


def check_update(config: GateConfig, norm: float, accepted: list[float]) -> str | None:
    """The max_update_ratio gate: None if there is no such gate, else its name once passed."""
    if config.max_update_ratio is None:
        return None
    if accepted:
        median = statistics.median(accepted)
        if median > 0 and norm > config.max_update_ratio * median:
            raise RejectedError(f"the checkpoint's update norm {norm:.4g} is {norm / median:.1f}× the median of "
                                f"accepted updates ({median:.4g}), above max_update_ratio = "
                                f"{config.max_update_ratio}; it may be corrupted or poisoned.", gate="max_update_ratio")
    return "max_update_ratio"


def _run(command: list[str], tick: Callable[[], None] | None) -> tuple[int, str, str]:
    """Run a command to completion, calling ``tick`` every second meanwhile (the daemon's watchdog ping and
    stop check: if it raises, the command is killed)."""
    deadline = time.monotonic() + EVAL_TIMEOUT_SECONDS
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=child_environment()) as process:
        try:
            while True:
                try:
                    out, err = process.communicate(timeout=1.0)
                    return process.returncode, out, err
                except subprocess.TimeoutExpired:
                    if time.monotonic() > deadline:
                        raise
                    if tick is not None:
                        tick()
        except BaseException:
            process.kill()
            raise


def evaluate(config: GateConfig, candidate: Path, *, check_minimums: bool = True,
             tick: Callable[[], None] | None = None) -> dict[str, float]:
    """Run the eval command on a model folder and return its metrics. On the candidate merged model every
    ``min`` must hold; on a checkpoint that lacks training metrics (``check_minimums=False``) the command
    only measures it, for metric-weighted methods."""
    assert config.eval is not None
    command = [part.replace("{model}", str(candidate)) for part in shlex.split(config.eval)]
    try:
        returncode, stdout, stderr = _run(command, tick)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RejectedError(f"the eval command {config.eval!r} could not run: {exc}.", gate="eval") from exc
    if returncode != 0:
        tail = (stderr.strip().splitlines() or ["no output"])[-1]
        raise RejectedError(f"the eval command exited {returncode} on the candidate ({tail}).", gate="eval")
    try:
        metrics = json.loads(stdout.strip().splitlines()[-1])
        metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
    except (IndexError, ValueError, AttributeError) as exc:
        raise RejectedError(f"the eval command printed no JSON object of metrics on its last line ({exc}).",
                            gate="eval") from exc
    for name, minimum in (config.min if check_minimums else {}).items():
        if name not in metrics:
            raise RejectedError(f"the eval command reported no {name!r} metric, which the policy's min needs.",
                                gate="eval")
        if metrics[name] < minimum:
            raise RejectedError(f"the candidate merged model scored {name} = {metrics[name]:.4g}, below the "
                                f"policy's minimum {minimum}.", gate="eval")
    return metrics
