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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergeops import patterns, untrusted
from mergeops.errors import ModelFolderError, RejectedError, UntrustedFileError
from mergeops.model.architectures import Family, stored_in_out
from mergeops.model.folder import INDEX_FILE, SINGLE_FILE, ModelFolder
from mergeops.model.problems import Problem

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_ADAPTER_WEIGHTS = ("adapter_model.bin", "adapter_model.pt")
PEFT_PREFIX = "base_model.model."  # PEFT names a module of the wrapped model with this prefix
_BASE_COPY = ".base_layer.weight"
_FACTOR_KEY = re.compile(r"^(?P<module>.+)\.(?P<factor>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?$")
MAX_CONFIG_BYTES = 1 << 20
# Pattern-module pairs one adapter's patterns are matched on: about 15 s at the 4 µs a pair takes. PEFT tests each pair
# too; a real config has a few hundred patterns (one per module at most), while 1 MiB of them against the modules of a
# 2 MB header would take the scan, and `inspect`, 45 minutes.
MAX_PATTERN_TESTS = 1 << 22
PEFT_DEFAULT_RANK, PEFT_DEFAULT_ALPHA = 8, 8  # LoraConfig's defaults, for a config that leaves them out

# Settings that do not change the update (training, initialisation, bookkeeping), or that name modules, which the
# weights' keys say exactly.
_INERT_SETTINGS = frozenset({
    "auto_mapping", "base_model_name_or_path", "exclude_modules", "inference_mode", "init_lora_weights", "loftq_config",
    "lora_dropout", "megatron_config", "megatron_core", "peft_version", "qalora_group_size", "revision",
    "target_modules", "task_type", "eva_config", "corda_config", "lora_ga_config", "ensure_weight_tying",
})
_UNDERSTOOD_SETTINGS = frozenset({"peft_type", "r", "lora_alpha", "use_rslora", "fan_in_fan_out", "rank_pattern",
                                  "alpha_pattern", "bias", "layers_to_transform", "layers_pattern"})
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
    target_modules: str | tuple[str, ...]  # PEFT's: a regular expression, names (matched as suffixes), "all-linear"
    exclude_modules: str | tuple[str, ...]
    layers: frozenset[int] | None = None  # PEFT's layers_to_transform: only modules of these layers are adapted

    def modules(self, names: Sequence[str]) -> dict[str, ModuleSettings]:
        """PEFT's settings of each module of ``names``: whether its target and exclude rules adapt it (factors of any
        other module would be ignored by PEFT, so the adapter's files do not belong together), and its rank and alpha
        under the per-module patterns. All patterns are matched at once, in bounded time; raises
        :class:`~mergeops.patterns.PatternError` naming one that cannot be matched."""
        regexes = [rule for rule in (self.target_modules, self.exclude_modules) if rule and isinstance(rule, str)]
        written = {_rule(rule): rule for rule in regexes}  # each pattern as matched -> as the config writes it
        written |= {_key_pattern(key): key for key in (*self.rank_pattern, *self.alpha_pattern)}
        if len(written) * len(names) > MAX_PATTERN_TESTS:
            raise patterns.PatternError(next(iter(written.values())), f"and the config's {len(written) - 1} other "
                                        f"module patterns, matched against {len(names)} modules, make "
                                        f"{len(written) * len(names)} tests, more than the {MAX_PATTERN_TESTS} "
                                        "mergeops makes; name fewer patterns")
        try:
            matched = dict(zip(written, patterns.matching(list(written), names), strict=True))
        except patterns.PatternError as exc:  # named as the config writes it, not as PEFT composes it
            raise patterns.PatternError(next(written[p] for p in written if p.source == exc.source), exc.reason) \
                from None

        def named(rule: str | tuple[str, ...], module: str) -> bool:
            """PEFT's target rule: a string is a regular expression the whole name matches; names match the module's
            name or its end after a dot."""
            if isinstance(rule, str):
                return module in matched[_rule(rule)]
            return any(module == name or module.endswith("." + name) for name in rule)

        def value(keyed: Mapping[str, Any], module: str, default: Any) -> Any:
            """PEFT's get_pattern_key: the value of the first key (in the config's order) that the module's name, or
            its end after a dot, matches; else the key that is the module's name itself, else the default."""
            key = next((key for key in keyed if module in matched[_key_pattern(key)]), module)
            return keyed.get(key, default)

        return {module: ModuleSettings(
            targeted=(self.target_modules == "all-linear" or named(self.target_modules, module))
            and not (self.exclude_modules and named(self.exclude_modules, module))
            and (self.layers is None or layer_index(module) in self.layers),
            rank=value(self.rank_pattern, module, self.rank),
            alpha=float(value(self.alpha_pattern, module, self.alpha))) for module in names}

    def scale(self, alpha: float, rank: int) -> float:
        """scale = alpha / r, or alpha / √r with rsLoRA."""
        return alpha / math.sqrt(rank) if self.rslora else alpha / rank

    def summary(self) -> dict[str, Any]:
        """What the ledger and cards record about the adapter, and what its update depends on besides its factors
        (the weights digest covers this, not the config file's bytes)."""
        targets = self.target_modules if isinstance(self.target_modules, str) else sorted(self.target_modules)
        return {"peft_type": "LORA", "r": self.rank, "lora_alpha": self.alpha, "use_rslora": self.rslora,
                "fan_in_fan_out": self.fan_in_fan_out, "target_modules": targets,
                "base_model_name_or_path": self.base_model,
                **({"rank_pattern": dict(self.rank_pattern)} if self.rank_pattern else {}),
                **({"alpha_pattern": dict(self.alpha_pattern)} if self.alpha_pattern else {}),
                **({"layers_to_transform": sorted(self.layers)} if self.layers is not None else {})}


@dataclass(frozen=True)
class ModuleSettings:
    """What an adapter's config says about one module."""

    targeted: bool
    rank: int
    alpha: float


def layer_index(module: str) -> int | None:
    r"""PEFT's layer number of a module, for layers_to_transform without layers_pattern: what
    re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module) finds, the first part of the name after its second that is all
    digits and not its last part. Found without the regex: the name is untrusted, and the lazy match is quadratic."""
    parts = module.split(".")
    for k in range(2, len(parts) - 1):
        if "\n" in ".".join(parts[:k - 1]):  # ".*?" stops at a line break
            return None
        if parts[k].isdecimal():  # \d: any decimal digit, as int() reads them
            return int(parts[k])
    return None


def _rule(rule: str) -> patterns.Pattern:
    """PEFT's target_modules or exclude_modules as one string: re.fullmatch(rule, module)."""
    return patterns.compile(rule)


def _key_pattern(key: str) -> patterns.Pattern:
    r"""PEFT's rule for a rank/alpha pattern key (get_pattern_key): re.match(rf"(.*\.)?({key})$", module), the
    module's name, or its end after a dot, matches the key."""
    return patterns.compile(rf"(.*\.)?({key})$", whole=False)


def is_adapter_folder(path: str | Path) -> bool:
    """Whether ``path`` holds a PEFT adapter (its config) rather than a full model."""
    return (Path(path) / ADAPTER_CONFIG).exists()


def read_settings(path: Path) -> tuple[LoraSettings | None, Problem | None]:
    """The LoRA settings of the adapter folder ``path``, or the problem with its ``adapter_config.json``."""
    file = path / ADAPTER_CONFIG

    def problem(what: str, code: str = "bad_adapter_config") -> tuple[None, Problem]:
        return None, Problem(code, f"{file} {what}.", ADAPTER_CONFIG)

    try:
        target = untrusted.resolved(file)
    except UntrustedFileError as exc:
        return problem(exc.reason)
    if not target.is_relative_to(path.resolve()):
        return problem(f"is a symlink to {target}, outside the adapter's folder; replace it with a copy",
                       "path_escape")
    try:
        config = untrusted.read_json(file, max_bytes=MAX_CONFIG_BYTES)
    except UntrustedFileError as exc:
        return problem(exc.reason)
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
    rank, alpha = config.get("r", PEFT_DEFAULT_RANK), config.get("lora_alpha", PEFT_DEFAULT_ALPHA)
    if not _positive_int(rank):
        return problem(f"has r = {rank!r}; it must be a positive whole number")
    if not _finite_number(alpha):
        return problem(f"has lora_alpha = {alpha!r}; it must be a finite number")
    keyed = {}
    for key, check in (("rank_pattern", _positive_int), ("alpha_pattern", _finite_number)):
        value = config.get(key) or {}
        if not isinstance(value, dict) or not all(isinstance(k, str) and check(v) for k, v in value.items()):
            return problem(f"has a {key} that is not an object of module patterns to numbers")
        for pattern in value:
            try:
                _key_pattern(pattern)
            except patterns.PatternError as exc:  # named as the file has it, not as PEFT composes it
                return problem(f"has a {key} key {patterns.PatternError(pattern, exc.reason)}")
        keyed[key] = value
    rules = {}
    for key in ("target_modules", "exclude_modules"):
        value = config.get(key) or ()
        if isinstance(value, list) and all(isinstance(name, str) for name in value):
            value = tuple(value)
        elif not isinstance(value, str | tuple):
            return problem(f"has a {key} that is neither a regular expression nor a list of module names")
        if isinstance(value, str) and value != "all-linear":
            try:
                _rule(value)
            except patterns.PatternError as exc:
                return problem(f"has a {key} {exc}")
        rules[key] = value
    layers = config.get("layers_to_transform")
    layers = [layers] if _layer(layers) else layers if layers != [] else None
    if layers is not None and not (isinstance(layers, list) and all(_layer(i) for i in layers)):
        return problem("has a layers_to_transform that is neither a layer number nor a list of them")
    if layers is not None and config.get("layers_pattern"):
        return problem(f"sets layers_pattern = {json.dumps(config['layers_pattern'])[:80]} with layers_to_transform, "
                       "which cannot be merged (mergeops finds layers only as PEFT does without a pattern); retrain "
                       "without it, or merge the adapter into a full checkpoint first", "unsupported_adapter")
    for key in ("use_rslora", "fan_in_fan_out"):
        if not isinstance(config.get(key, False), bool):
            return problem(f"has {key} = {config[key]!r}; it must be true or false")
    base_model = config.get("base_model_name_or_path")
    if base_model is not None and not isinstance(base_model, str):
        return problem("has a base_model_name_or_path that is not a string")
    return LoraSettings(rank, float(alpha), config.get("use_rslora", False), config.get("fan_in_fan_out", False),
                        keyed["rank_pattern"], keyed["alpha_pattern"], base_model,
                        rules["target_modules"], rules["exclude_modules"],
                        frozenset(layers) if layers is not None else None), None


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 1 << 20


def _layer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 20


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
    embedding: bool  # an embedding's factors (lora_embedding_A/B): ΔW = scale · (B·A)ᵀ


class Adapter:
    """A LoRA adapter folder: its settings, its weights (a :class:`ModelFolder` over ``adapter_model.safetensors``)
    and the base tensor each pair of factors updates."""

    def __init__(self, folder: ModelFolder, settings: LoraSettings, targets: dict[str, LoraTarget],
                 base_copies: dict[str, str] | None = None) -> None:
        self.folder = folder
        self.settings = settings
        self.targets = targets  # by base tensor name
        # base tensor -> the adapter's copy of it (PEFT's save_embedding_layers): must be the base's, unchanged
        self.base_copies = base_copies or {}

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
        if (root / SINGLE_FILE).exists() or (root / INDEX_FILE).exists():
            return None, [Problem("ambiguous_checkpoint", f"{root} holds both a LoRA adapter ({ADAPTER_CONFIG}) and a "
                                  "full model's weights; keep one of them in the folder.", ADAPTER_CONFIG)]
        pickles = [name for name in PICKLE_ADAPTER_WEIGHTS if (root / name).exists()]
        if pickles and not (root / ADAPTER_WEIGHTS).exists():
            return None, [Problem("pickle_weights", f"{root} holds its adapter's factors only as pickle "
                                  f"({pickles[0]}), which is never loaded (it can execute code); save the adapter with "
                                  "safetensors (save_pretrained(safe_serialization=True)).", pickles[0])]
        folder, problems = ModelFolder.scan(root, ADAPTER_WEIGHTS)
        if folder is None or problems:
            if folder is not None:
                folder.close()
            return None, problems
        targets, base_copies, problems = _targets(folder, settings)
        if problems:
            folder.close()
            return None, problems
        return cls(folder, settings, targets, base_copies), []

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

    def transposed(self, tensor: str, family: Family | None) -> bool:
        """Whether the update of ``tensor`` is (B·A)ᵀ: an embedding's, or a weight the base stores [in, out] (GPT-2's
        Conv1D). PEFT decides this per layer from the module's type, whatever ``fan_in_fan_out`` says; only for a
        family the table does not know is the config's word taken."""
        if self.targets[tensor].embedding:
            return True
        return stored_in_out(family, tensor) if family is not None else self.settings.fan_in_fan_out

    def update_shape(self, tensor: str, family: Family | None = None) -> tuple[int, int]:
        target = self.targets[tensor]
        rows, columns = self.folder.tensors[target.b].shape[0], self.folder.tensors[target.a].shape[1]
        return (columns, rows) if self.transposed(tensor, family) else (rows, columns)

    def factors(self, tensor: str, family: Family | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(left, right)`` in float32 with ΔW = left @ right for base tensor ``tensor`` of a base of ``family`` (the
        scale is in left)."""
        target = self.targets[tensor]
        a, b = self.folder.read(target.a).float(), self.folder.read(target.b).float()
        for key, values in ((target.a, a), (target.b, b)):  # before any factorisation sees them
            if not bool(torch.isfinite(values).all()):
                raise RejectedError(f"LoRA factor {key!r} of {self.path / ADAPTER_WEIGHTS} has non-finite values (NaN "
                                    "or Inf); the adapter is corrupted or its training diverged, so it cannot be "
                                    "merged.", gate="finite")
        if self.transposed(tensor, family):  # (B·A)ᵀ = Aᵀ·Bᵀ
            return a.T.mul(target.scale), b.T.contiguous()
        return b.mul(target.scale), a

    def close(self) -> None:
        self.folder.close()

    def __enter__(self) -> Adapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _targets(folder: ModelFolder, settings: LoraSettings
             ) -> tuple[dict[str, LoraTarget], dict[str, str], list[Problem]]:
    """Pair the factors by module; every tensor of the file must be one of a pair, or a copy of a base weight PEFT
    saves beside a targeted embedding or head (``<module>.base_layer.weight``)."""
    where = folder.path / ADAPTER_WEIGHTS

    def refused(code: str, message: str, tensor: str) -> tuple[dict[str, LoraTarget], dict[str, str], list[Problem]]:
        return {}, {}, [Problem(code, message, ADAPTER_WEIGHTS, tensor)]

    pairs: dict[str, dict[str, str]] = {}
    base_copies: dict[str, str] = {}
    for name, info in folder.tensors.items():
        if name.startswith(PEFT_PREFIX) and name.endswith(_BASE_COPY):
            base_copies[name.removeprefix(PEFT_PREFIX).removesuffix(_BASE_COPY) + ".weight"] = name
            continue
        match = _FACTOR_KEY.match(name)
        if not name.startswith(PEFT_PREFIX) or match is None:
            what = "a DoRA magnitude" if "lora_magnitude_vector" in name else "not a LoRA factor"
            return refused("unsupported_adapter", f"{where} holds tensor {name!r}, {what}; only plain LoRA adapters "
                           "(lora_A/lora_B pairs) can be merged.", name)
        if len(info.shape) != 2 or not info.dtype.is_floating_point:
            return refused("bad_adapter_tensor", f"LoRA factor {name!r} of {where} is {info.entry.dtype} "
                           f"{list(info.shape)}; factors are 2-D floating-point matrices.", name)
        module, factor = match["module"].removeprefix(PEFT_PREFIX), match["factor"]
        factors = pairs.setdefault(module, {})
        if factor in factors:
            return refused("bad_adapter_tensor", f"{where} holds two {factor} factors of module {module!r}, "
                           f"{factors[factor]!r} and {name!r}; the file is not one adapter.", name)
        factors[factor] = name
    try:
        configured = settings.modules(list(pairs))
    except patterns.PatternError as exc:
        why = f"{folder.path / ADAPTER_CONFIG} has a module pattern that cannot be used: {exc}."
        return {}, {}, [Problem("bad_adapter_config", why, ADAPTER_CONFIG)]
    targets = {}
    for module, factors in pairs.items():
        if not configured[module].targeted:
            return refused("untargeted_module", f"{where} holds factors of module {module!r}, which {ADAPTER_CONFIG}'s "
                           "target_modules, exclude_modules and layers_to_transform do not adapt (PEFT would ignore "
                           "them); the adapter's files do not belong together.", next(iter(factors.values())))
        embedding = "lora_embedding_A" in factors or "lora_embedding_B" in factors
        a, b = (factors.get("lora_embedding_A"), factors.get("lora_embedding_B")) if embedding else \
            (factors.get("lora_A"), factors.get("lora_B"))
        if a is None or b is None or len(factors) != 2:
            return refused("bad_adapter_tensor", f"{where} has an incomplete pair of LoRA factors for module "
                           f"{module!r} ({', '.join(sorted(factors))}); the file is damaged or was saved partly.",
                           next(iter(factors.values())))
        rank = folder.tensors[a].shape[0]
        if folder.tensors[b].shape[1] != rank:
            return refused("bad_adapter_tensor", f"LoRA factors of module {module!r} do not fit each other: A is "
                           f"{list(folder.tensors[a].shape)} and B {list(folder.tensors[b].shape)} in {where}.", a)
        expected = configured[module].rank
        if rank != expected:
            return refused("bad_adapter_tensor", f"LoRA factor {a!r} has rank {rank} but {ADAPTER_CONFIG} says r = "
                           f"{expected} for module {module!r}; the adapter's files do not belong together.", a)
        tensor = f"{module}.weight"
        targets[tensor] = LoraTarget(tensor, module, a, b, settings.scale(configured[module].alpha, rank),
                                     embedding)
    return targets, base_copies, []
