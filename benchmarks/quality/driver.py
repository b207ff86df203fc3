"""Driving mergeops exactly as a user would: policy files written as TOML, and the ``mergeops`` command run in a
subprocess for every key, fold and protection (``--json`` output parsed; a rejection is an error here). And
mergekit, the same way: a YAML config and ``mergekit-yaml`` from its own virtualenv."""

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


def write_policy(path: Path, base: Path, signing_key: Path, methods: Sequence[Method], keep: int = 1,
                 gate: dict[str, Any] | None = None) -> Path:
    """A policy with one stream per method, all on ``base``; versions under ``merged/<stream>``, home ``state``;
    ``gate``: settings of every stream's gate table."""
    lines = ["# written by benchmarks/quality", 'home = "state"', "", "[keys]", f"signing = {_toml(signing_key)}"]
    for m in methods:
        lines += ["", f"[streams.{m.key}]", f"base = {_toml(base)}", f"method = {_toml(m.method)}",
                  f'output = "merged/{m.key}"', f"keep = {keep}", 'dtype = "base"']
        if m.params:
            lines += ["", f"[streams.{m.key}.params]", *(f"{k} = {_toml(v)}" for k, v in m.params.items())]
        if gate:
            lines += ["", f"[streams.{m.key}.gate]", *(f"{k} = {_toml(v)}" for k, v in gate.items())]
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

    def fold(self, policy: Path, stream: str, checkpoint: Path, allow_protected: bool = False) -> dict[str, Any]:
        """``mergeops fold --json``; ``allow_protected`` adds ``--allow-protected`` (fold a checkpoint even if it
        carries MergeLock marks)."""
        extra = ["--allow-protected"] if allow_protected else []
        result = json.loads(self.run("fold", checkpoint, "--policy", policy, "--stream", stream, "--json", *extra))
        if result["status"] != "merged":
            raise RuntimeError(f"mergeops did not merge {checkpoint} into {stream}: {result}")
        return result

    def protect(self, model: Path, out: Path, key: Path, anchor: Path, strength: int | None = None) -> dict[str, Any]:
        """``mergeops protect --anchor BASE --verify --json``, at ``strength`` (default: mergeops' default)."""
        extra = [] if strength is None else ["--strength", str(strength)]
        return json.loads(self.run("protect", model, "--out", out, "--key", key, "--anchor", anchor, "--verify",
                                   *extra, "--json"))


def prune(policy_dir: Path, stream: str) -> None:
    """Remove a finished stream's merged versions and method state (the ledger keeps the record)."""
    shutil.rmtree(policy_dir / "merged" / stream, ignore_errors=True)
    shutil.rmtree(policy_dir / "state" / "streams" / stream, ignore_errors=True)


MERGEKIT_LAUNCHER = Path(__file__).resolve().parent / "mergekit_yaml.py"


class Mergekit:
    """mergekit's ``mergekit-yaml`` from the virtualenv ``venv`` (benchmarks/perf/setup_mergekit.sh makes it), run
    through ``mergekit_yaml.py`` (mergekit 0.1.5 with its BERT planning bug fixed); offline, ``threads`` threads."""

    def __init__(self, venv: Path, threads: int) -> None:
        self.venv = venv
        self.python = venv / "bin" / "python"
        if not (venv / "bin" / "mergekit-yaml").is_file() or not self.python.exists():
            raise SystemExit(f"mergekit is not installed in {venv} (no {venv / 'bin' / 'mergekit-yaml'}): the "
                             "MergeLock experiment merges with mergekit too. Create the virtualenv with "
                             f"`benchmarks/perf/setup_mergekit.sh {venv}`, or pass --mergekit-venv DIR (default "
                             "$MERGEKIT_VENV, else /work/venvs/mergekit).")
        threads_env = {k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
        self.env = dict(os.environ) | threads_env | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        self.threads = threads
        self.seconds: list[float] = []
        done = subprocess.run([str(self.python), "-c", "from importlib.metadata import version; "
                               "print(version('mergekit'), version('torch'), version('transformers'))"],
                              env=self.env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{self.python} cannot import mergekit:\n{done.stderr.strip()}")
        self.versions = dict(zip(("mergekit", "torch", "transformers"), done.stdout.split(), strict=True))

    def merge(self, config: Mapping[str, Any], out: Path, donor: Path) -> Path:
        """Merge as ``config`` says into ``out`` (replaced), then give it ``donor``'s config and tokenizer files
        (mergekit writes the config of its own transformers; the evaluator loads every model the same way)."""
        shutil.rmtree(out, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        path = out.parent / f"{out.name}.yml"
        path.write_text(json.dumps(config, indent=1) + "\n")  # JSON is YAML
        argv = [str(self.python), str(MERGEKIT_LAUNCHER), str(path), str(out), "--no-copy-tokenizer", "--quiet",
                "--num-threads", str(self.threads)]
        started = time.perf_counter()
        done = subprocess.run(argv, env=self.env, capture_output=True, text=True, check=False)
        self.seconds.append(time.perf_counter() - started)
        if done.returncode != 0:
            raise RuntimeError(f"`{' '.join(argv)}` exited {done.returncode}:\n{done.stderr.strip()[-4000:]}")
        for item in donor.iterdir():
            if item.is_file() and not item.name.endswith(".safetensors") and item.name != "README.md":
                shutil.copyfile(item, out / item.name)
        return out


def mergekit_config(method: Method, models: Sequence[Path], base: Path) -> dict[str, Any]:
    """A mergekit config for ``method`` (``linear``, or ``ties`` on ``base``; ``method.params``: ``weight`` per model,
    ``density`` for TIES, ``normalize``) merging ``models`` in float32."""
    params = dict(method.params)
    per_model = {k: params.pop(k) for k in ("weight", "density") if k in params}
    config: dict[str, Any] = {"merge_method": method.method,
                              "models": [{"model": str(m), "parameters": per_model} for m in models],
                              "parameters": params, "dtype": "float32"}
    if method.method == "ties":
        config["base_model"] = str(base)
    elif method.method != "linear":
        raise ValueError(f"no mergekit configuration for {method.method!r}")
    return config
