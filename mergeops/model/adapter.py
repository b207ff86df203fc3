"""PEFT LoRA adapters on disk: ``adapter_config.json`` plus ``adapter_model.safetensors``.

An adapter changes a few 2-D tensors of its base by ΔW = scale · B·A (transposed for embeddings and for
``fan_in_fan_out`` weights, which are stored [in, out]), with scale = lora_alpha / r, or lora_alpha / √r with
rsLoRA. :class:`Adapter` reads the config and the weights' headers, names the base tensor each factor pair
updates, and reads a pair as ``(left, right)`` with ΔW = left @ right: the whole update of a tensor costs the
memory of its two small factors, and any block of its rows is ``left[rows] @ right``.

Only plain LoRA is understood. Every setting of the config that changes what the adapter computes is either
handled here or refused by name (DoRA, biases, ``modules_to_save``, other PEFT types, ...).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergeops.errors import ModelFolderError, RejectedError
from mergeops.model.folder import ModelFolder
from mergeops.model.problems import Problem

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT names a module of the wrapped model with this prefix
_FACTOR_KEY = re.compile(r"^(?P<module>.+)\.(?P<factor>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?$")
MAX_CONFIG_BYTES = 1 << 20

# Settings that do not change the update (training, initialisation, bookkeeping), or that name modules, which the
# weights' keys say exactly.
_INERT_SETTINGS = frozenset({
    "auto_mapping", "base_model_name_or_path", "exclude_modules", "inference_mode", "init_lora_weights",
    "layers_pattern", "layers_to_transform", "loftq_config", "lora_dropout", "megatron_config", "megatron_core",
    "peft_version", "qalora_group_size", "revision", "target_modules", "task_type", "eva_config", "corda_config",
    "lora_ga_config", "ensure_weight_tying",
})
_UNDERSTOOD_SETTINGS = frozenset({"peft_type", "r", "lora_alpha", "use_rslora", "fan_in_fan_out", "rank_pattern",
                                  "alpha_pattern", "bias"})
_REFUSED_HINTS = {
    "use_dora": "DoRA rescales each weight's columns by a learned magnitude, so its update is not B·A",
    "modules_to_save": "it replaces whole modules",
    "lora_bias": "it trains a bias for B",
    "trainable_token_indices": "it trains single embedding rows",
    "target_parameters": "it adapts parameters rather than modules",
    "layer_replication": "it changes the model's layers",
}


@dataclass(frozen=True)
class LoraSettings:
    """What an adapter's config says about its update."""

    rank: int
    alpha: float
    rslora: bool
    fan_in_fan_out: bool
    rank_pattern: Mapping[str, int]
    alpha_pattern: Mapping[str, float]
    base_model: str | None
    target_modules: Any
    raw: Mapping[str, Any]

    def scale(self, module: str, rank: int) -> float:
        """scale = alpha / r (or / √r with rsLoRA), with PEFT's per-module patterns: a pattern key matches a module
        whose name is the key or ends with "." + key (as a regular expression), the first in the config's order."""
        alpha = float(_pattern_value(self.alpha_pattern, module, self.alpha))
        return alpha / math.sqrt(rank) if self.rslora else alpha / rank

    def summary(self) -> dict[str, Any]:
        """What the ledger and cards record about the adapter."""
        return {"peft_type": "LORA", "r": self.rank, "lora_alpha": self.alpha, "use_rslora": self.rslora,
                "fan_in_fan_out": self.fan_in_fan_out, "target_modules": self.target_modules,
                "base_model_name_or_path": self.base_model,
                **({"rank_pattern": dict(self.rank_pattern)} if self.rank_pattern else {}),
                **({"alpha_pattern": dict(self.alpha_pattern)} if self.alpha_pattern else {})}


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    for key, value in patterns.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", module):
            return value
    return default


def is_adapter_folder(path: str | Path) -> bool:
    """Whether ``path`` holds a PEFT adapter (its config) rather than a full model."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_settings(path: Path) -> tuple[LoraSettings | None, Problem | None]:
    """The LoRA settings of the adapter folder ``path``, or the problem with its ``adapter_config.json``."""
    file = path / ADAPTER_CONFIG

    def problem(what: str, code: str = "bad_adapter_config") -> tuple[None, Problem]:
        return None, Problem(code, f"{file} {what}.", ADAPTER_CONFIG)

    if not file.resolve().is_relative_to(path.resolve()):
        return problem(f"is a symlink to {file.resolve()}, outside the adapter's folder; replace it with a copy",
                       "path_escape")
    try:
        with open(file, "rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            return problem(f"is larger than {MAX_CONFIG_BYTES >> 20} MiB, far beyond any adapter config; it is not one")
        config = json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)
    except OSError as exc:
        return problem(f"cannot be read ({exc.strerror})")
    except UnicodeDecodeError:
        return problem("is not UTF-8 text; copy it again from the adapter's source")
    except ValueError as exc:
        return problem(f"is not valid JSON ({exc}); copy it again from the adapter's source")
    if not isinstance(config, dict):
        return problem(f"is a JSON {type(config).__name__}, not an object")
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        return problem(f"has peft_type {peft_type!r}; only LoRA adapters (peft_type \"LORA\") can be merged",
                       "unsupported_adapter")
    for key, value in config.items():
        if key in _INERT_SETTINGS or key in _UNDERSTOOD_SETTINGS or not value:
            continue
        why = _REFUSED_HINTS.get(key, "mergeops does not know how it changes the update")
        return problem(f"sets {key} = {json.dumps(value)[:80]}, which cannot be merged ({why}); only plain LoRA "
                       "adapters can be merged: retrain without it, or merge the adapter into a full checkpoint first",
                       "unsupported_adapter")
    if config.get("bias", "none") != "none":
        return problem(f"sets bias = {config['bias']!r}: adapters that train biases cannot be merged; only "
                       "bias = \"none\" is supported", "unsupported_adapter")
    rank, alpha = config.get("r"), config.get("lora_alpha", config.get("r"))
    if not _positive_int(rank):
        return problem(f"has r = {rank!r}; it must be a positive whole number")
    if not _finite_number(alpha):
        return problem(f"has lora_alpha = {alpha!r}; it must be a finite number")
    patterns = {}
    for key, check in (("rank_pattern", _positive_int), ("alpha_pattern", _finite_number)):
        value = config.get(key) or {}
        if not isinstance(value, dict) or not all(isinstance(k, str) and check(v) for k, v in value.items()):
            return problem(f"has a {key} that is not an object of module patterns to numbers")
        try:
            for pattern in value:
                re.compile(pattern)
        except re.error as exc:
            return problem(f"has a {key} key that is not a regular expression ({exc})")
        patterns[key] = value
    for key in ("use_rslora", "fan_in_fan_out"):
        if not isinstance(config.get(key, False), bool):
            return problem(f"has {key} = {config[key]!r}; it must be true or false")
    base_model = config.get("base_model_name_or_path")
    if base_model is not None and not isinstance(base_model, str):
        return problem("has a base_model_name_or_path that is not a string")
    return LoraSettings(rank, float(alpha), config.get("use_rslora", False), config.get("fan_in_fan_out", False),
                        patterns["rank_pattern"], patterns["alpha_pattern"], base_model,
                        config.get("target_modules"), config), None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 1 << 20


def _finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) \
        and abs(value) <= 1e6


@dataclass(frozen=True)
class LoraTarget:
    """One base tensor an adapter updates: ΔW = scale · B·A, or its transpose."""

    tensor: str  # the base tensor's name
    module: str
    a: str  # the adapter's tensor names
    b: str
    scale: float
    transposed: bool  # ΔW = scale · (B·A)ᵀ: an embedding, or a weight stored [in, out] (fan_in_fan_out)

    def shape_of_update(self, a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> tuple[int, int]:
        rows, columns = b_shape[0], a_shape[1]
        return (columns, rows) if self.transposed else (rows, columns)


class Adapter:
    """A LoRA adapter folder: its settings, its weights (a :class:`ModelFolder` over ``adapter_model.safetensors``)
    and the base tensor each pair of factors updates."""

    def __init__(self, folder: ModelFolder, settings: LoraSettings, targets: dict[str, LoraTarget]) -> None:
        self.folder = folder
        self.settings = settings
        self.targets = targets  # by base tensor name

    @property
    def path(self) -> Path:
        return self.folder.path

    @classmethod
    def scan(cls, path: str | Path) -> tuple[Adapter | None, list[Problem]]:
        """Read the adapter's config and weight headers; the problems if it is not a LoRA adapter mergeops can
        read. Whether it fits a base is checked against the base (``intake.validate``)."""
        root = Path(path)
        settings, problem = read_settings(root)
        if problem is not None:
            return None, [problem]
        assert settings is not None
        folder, problems = ModelFolder.scan(root, ADAPTER_WEIGHTS)
        if folder is None or problems:
            if folder is not None:
                folder.close()
            return None, problems
        targets, problems = _targets(folder, settings)
        if problems:
            folder.close()
            return None, problems
        return cls(folder, settings, targets), []

    @classmethod
    def open(cls, path: str | Path) -> Adapter:
        adapter, problems = cls.scan(path)
        if problems:
            raise ModelFolderError(problems[0].message)
        assert adapter is not None
        return adapter

    @property
    def parameters(self) -> int:
        return sum(info.numel for info in self.folder.tensors.values())

    @property
    def total_bytes(self) -> int:
        return self.folder.total_bytes

    def describe(self) -> dict[str, Any]:
        """What ``inspect`` shows: its settings, ranks, targets, and how many full-size parameters it updates."""
        ranks = sorted({self.rank(t) for t in self.targets})
        return {**self.settings.summary(), "ranks": ranks, "targets": sorted(t.module for t in self.targets.values()),
                "parameters": self.parameters,
                "updates_parameters": sum(math.prod(self.update_shape(t)) for t in self.targets)}

    def rank(self, tensor: str) -> int:
        return self.folder.tensors[self.targets[tensor].a].shape[0]

    def update_shape(self, tensor: str) -> tuple[int, int]:
        target = self.targets[tensor]
        return target.shape_of_update(self.folder.tensors[target.a].shape, self.folder.tensors[target.b].shape)

    def factors(self, tensor: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(left, right)`` in float32 with ΔW = left @ right for base tensor ``tensor`` (the scale is in left)."""
        target = self.targets[tensor]
        a, b = self.folder.read(target.a).float(), self.folder.read(target.b).float()
        for key, values in ((target.a, a), (target.b, b)):  # before any factorisation sees them
            if not bool(torch.isfinite(values).all()):
                raise RejectedError(f"LoRA factor {key!r} of {self.path / ADAPTER_WEIGHTS} has non-finite values (NaN "
                                    "or Inf); the adapter is corrupted or its training diverged, so it cannot be "
                                    "merged.", gate="finite")
        if target.transposed:  # (B·A)ᵀ = Aᵀ·Bᵀ
            return a.T.mul(target.scale), b.T.contiguous()
        return b.mul(target.scale), a

    def close(self) -> None:
        self.folder.close()

    def __enter__(self) -> Adapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _targets(folder: ModelFolder, settings: LoraSettings) -> tuple[dict[str, LoraTarget], list[Problem]]:
    """Pair the factors by module; every tensor of the file must be one of a pair."""
    pairs: dict[str, dict[str, str]] = {}
    for name, info in folder.tensors.items():
        match = _FACTOR_KEY.match(name)
        if not name.startswith(PEFT_PREFIX) or match is None:
            what = "a DoRA magnitude" if "lora_magnitude_vector" in name else "not a LoRA factor"
            return {}, [Problem("unsupported_adapter", f"{folder.path / ADAPTER_WEIGHTS} holds tensor {name!r}, "
                                f"{what}; only plain LoRA adapters (lora_A/lora_B pairs) can be merged.",
                                ADAPTER_WEIGHTS, name)]
        if len(info.shape) != 2 or not info.dtype.is_floating_point:
            return {}, [Problem("bad_adapter_tensor", f"LoRA factor {name!r} of {folder.path / ADAPTER_WEIGHTS} is "
                                f"{info.entry.dtype} {list(info.shape)}; factors are 2-D floating-point matrices.",
                                ADAPTER_WEIGHTS, name)]
        module = match["module"].removeprefix(PEFT_PREFIX)
        pairs.setdefault(module, {})[match["factor"]] = name
    targets = {}
    for module, factors in pairs.items():
        embedding = "lora_embedding_A" in factors or "lora_embedding_B" in factors
        a, b = (factors.get("lora_embedding_A"), factors.get("lora_embedding_B")) if embedding else \
            (factors.get("lora_A"), factors.get("lora_B"))
        if a is None or b is None or len(factors) != 2:
            return {}, [Problem("bad_adapter_tensor", f"{folder.path / ADAPTER_WEIGHTS} has an incomplete pair of "
                                f"LoRA factors for module {module!r} ({', '.join(sorted(factors))}); the file is "
                                "damaged or was saved partly.", ADAPTER_WEIGHTS, next(iter(factors.values())))]
        rank = folder.tensors[a].shape[0]
        if folder.tensors[b].shape[1] != rank:
            return {}, [Problem("bad_adapter_tensor", f"LoRA factors of module {module!r} do not fit each other: A is "
                                f"{list(folder.tensors[a].shape)} and B {list(folder.tensors[b].shape)} in "
                                f"{folder.path / ADAPTER_WEIGHTS}.", ADAPTER_WEIGHTS, a)]
        expected = _pattern_value(settings.rank_pattern, module, settings.rank)
        if rank != expected:
            return {}, [Problem("bad_adapter_tensor", f"LoRA factor {a!r} has rank {rank} but {ADAPTER_CONFIG} says "
                                f"r = {expected} for module {module!r}; the adapter's files do not belong together.",
                                ADAPTER_WEIGHTS, a)]
        tensor = f"{module}.weight"
        targets[tensor] = LoraTarget(tensor, module, a, b, settings.scale(module, rank),
                                     transposed=embedding or settings.fan_in_fan_out)
    return targets, []
