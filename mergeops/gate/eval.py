"""The eval gate (SPEC §6): run the policy's eval command on a model folder, read its metrics, check the minimums.

On the candidate merged model every ``min`` must hold before the version is committed; on a checkpoint that lacks
the training metrics its method needs, the command only measures it.
"""

from __future__ import annotations

import contextlib
import math
import os
import shlex
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mergeops import untrusted
from mergeops.errors import RejectedError, UntrustedFileError
from mergeops.gate.base import Subject
from mergeops.policy import GateConfig
from mergeops.systemd import child_environment

SECRET_NAMES = ("TOKEN", "SECRET", "PASSWORD", "CREDENTIAL", "API_KEY", "PRIVATE_KEY")
OUTPUT_LIMIT = 1 << 20  # bytes of the eval command's stdout and stderr that are read (the end of each)


def eval_environment(config: GateConfig, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The eval command's environment: the daemon's, without systemd's notify variables and without secrets (any
    name containing TOKEN, SECRET, PASSWORD, CREDENTIAL, API_KEY or PRIVATE_KEY, and systemd's credentials folder)
    unless the policy passes them by name in ``eval_env``."""
    source = os.environ if environ is None else environ
    passed = set(config.eval_env)
    return {k: v for k, v in child_environment(source).items()
            if k in passed or not (k == "CREDENTIALS_DIRECTORY" or any(s in k.upper() for s in SECRET_NAMES))}


def _run(command: list[str], config: GateConfig, tick: Callable[[], None] | None) -> tuple[int, bytes, bytes]:
    """Run a command in its own process group to completion or ``config.eval_timeout``, calling ``tick`` every
    second meanwhile (the daemon's watchdog ping and stop check: if it raises, the command is killed). Output goes
    to files, so a background grandchild that keeps stdout open cannot hold the fold; once the command ends, or on
    any error, its whole process group is killed."""
    deadline = time.monotonic() + config.eval_timeout
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                   env=eval_environment(config), start_new_session=True)
        try:
            while True:
                try:
                    returncode = process.wait(timeout=1.0)
                    break
                except subprocess.TimeoutExpired:
                    if time.monotonic() > deadline:
                        raise RejectedError(f"the eval command {config.eval!r} ran past eval_timeout = "
                                            f"{config.eval_timeout:g} s and was stopped.", gate="eval") from None
                    if tick is not None:
                        tick()
        finally:
            _kill_group(process)
        return returncode, _tail(out), _tail(err)


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)


def _tail(file: Any) -> bytes:
    size = file.seek(0, os.SEEK_END)
    file.seek(max(0, size - OUTPUT_LIMIT))
    return file.read()


def evaluate(config: GateConfig, candidate: Path, *, check_minimums: bool = True,
             tick: Callable[[], None] | None = None) -> dict[str, float]:
    """Run the eval command on a model folder and return its metrics. On the candidate merged model every
    ``min`` must hold; on a checkpoint that lacks training metrics (``check_minimums=False``) the command
    only measures it, for metric-weighted methods."""
    assert config.eval is not None
    command = [part.replace("{model}", str(candidate)) for part in shlex.split(config.eval)]
    try:
        returncode, stdout, stderr = _run(command, config, tick)
    except OSError as exc:
        raise RejectedError(f"the eval command {config.eval!r} could not run: {exc}.", gate="eval") from exc
    if returncode != 0:
        tail = (stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
        raise RejectedError(f"the eval command exited {returncode} on the candidate ({tail[:200]}).", gate="eval")
    minimums = config.min if check_minimums else {}
    metrics = _metrics(stdout, minimums)
    for name, minimum in minimums.items():
        if name not in metrics:
            raise RejectedError(f"the eval command reported no {name!r} metric, which the policy's min needs.",
                                gate="eval")
        if metrics[name] < minimum:
            raise RejectedError(f"the candidate merged model scored {name} = {metrics[name]:.4g}, below the "
                                f"policy's minimum {minimum}.", gate="eval")
    return metrics


def _metrics(stdout: bytes, required: Mapping[str, float]) -> dict[str, float]:
    """The numbers of the JSON object on the last line of the eval command's output. Other values (text) are
    ignored, but a metric the policy's ``min`` names must be a number, and no number may be NaN or infinite."""
    try:
        text = untrusted.decode_utf8(stdout, "the eval command's output")
    except UntrustedFileError:
        raise RejectedError("the eval command's output is not UTF-8 text; it must print a JSON object of metrics "
                            "on its last line.", gate="eval") from None
    try:
        document = untrusted.parse_json(text.strip().splitlines()[-1], "the eval command's last line", finite=False)
    except IndexError as exc:
        raise RejectedError(f"the eval command printed no JSON object of metrics on its last line ({exc}).",
                            gate="eval") from None
    except UntrustedFileError as exc:
        raise RejectedError(f"the eval command printed no JSON object of metrics on its last line: {exc}",
                            gate="eval") from None
    if not isinstance(document, dict):
        raise RejectedError(f"the eval command's last line is a JSON {type(document).__name__}, not an object of "
                            "metrics.", gate="eval")
    metrics = {}
    for name, value in document.items():
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if (number and not math.isfinite(value)) or (not number and name in required):
            raise RejectedError(f"the eval command reported {name} = {value!r}, not a finite number; a metric that "
                                "cannot be compared is a failed evaluation.", gate="eval")
        if number:
            metrics[name] = float(value)
    return metrics


class EvalGate:
    """The candidate merged model passes the eval command's minimums; its metrics are recorded with the version."""

    name = "eval"
    phase = "candidate"

    def __init__(self, config: GateConfig) -> None:
        self.config = config

    def check(self, subject: Subject) -> str:
        subject.eval_metrics = evaluate(self.config, subject.candidate, tick=subject.tick)
        return self.name
