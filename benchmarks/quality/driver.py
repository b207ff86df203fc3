"""Driving mergeops exactly as a user would: policy files written as TOML, and the ``mergeops`` command run in a
subprocess for every key, fold and protection (``--json`` output parsed; a rejection is an error here)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Method:
    key: str  # the stream's name in the policy: letters, digits, '-' and '_'
    label: str  # how tables show it
    method: str  # a mergeops method name
    params: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "label": self.label, "method": self.method, "params": dict(self.params)}


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")


def write_policy(path: Path, base: Path, signing_key: Path, methods: Sequence[Method], keep: int = 1) -> Path:
    """A policy with one stream per method, all on ``base``; versions under ``merged/<stream>``, home ``state``."""
    lines = ["# written by benchmarks/quality", 'home = "state"', "", "[keys]", f"signing = {_toml(signing_key)}"]
    for m in methods:
        lines += ["", f"[streams.{m.key}]", f"base = {_toml(base)}", f"method = {_toml(m.method)}",
                  f'output = "merged/{m.key}"', f"keep = {keep}", 'dtype = "base"']
        if m.params:
            lines += ["", f"[streams.{m.key}.params]", *(f"{k} = {_toml(v)}" for k, v in m.params.items())]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


class Mergeops:
    """The ``mergeops`` command, with ``threads`` OpenMP/MKL threads; records the wall time of every call."""

    def __init__(self, threads: int) -> None:
        found = shutil.which("mergeops")
        self.command = [found] if found else [sys.executable, "-m", "mergeops"]
        threads_env = {k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
        self.env = {k: v for k, v in os.environ.items() if k != "MERGEOPS_HOME"} | threads_env
        self.seconds: dict[str, list[float]] = {}

    def run(self, *args: str | Path) -> str:
        argv = [*self.command, *map(str, args)]
        started = time.perf_counter()
        done = subprocess.run(argv, env=self.env, capture_output=True, text=True, check=False)
        self.seconds.setdefault(str(args[0]), []).append(time.perf_counter() - started)
        if done.returncode != 0:
            raise RuntimeError(f"`{' '.join(argv)}` exited {done.returncode}:\n{done.stderr.strip()}\n{done.stdout}")
        return done.stdout

    def keygen(self, out: Path) -> Path:
        if not (out / "signing.pem").is_file():
            self.run("keygen", "--out", out)
        return out

    def fold(self, policy: Path, stream: str, checkpoint: Path) -> dict[str, Any]:
        result = json.loads(self.run("fold", checkpoint, "--policy", policy, "--stream", stream, "--json"))
        if result["status"] != "merged":
            raise RuntimeError(f"mergeops did not merge {checkpoint} into {stream}: {result}")
        return result

    def protect(self, model: Path, out: Path, key: Path, anchor: Path) -> dict[str, Any]:
        return json.loads(self.run("protect", model, "--out", out, "--key", key, "--anchor", anchor, "--verify",
                                   "--json"))


def prune(policy_dir: Path, stream: str) -> None:
    """Remove a finished stream's merged versions and method state (the ledger keeps the record)."""
    shutil.rmtree(policy_dir / "merged" / stream, ignore_errors=True)
    shutil.rmtree(policy_dir / "state" / "streams" / stream, ignore_errors=True)
