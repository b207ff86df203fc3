"""Turn a Hugging Face Trainer checkpoint's ``optimizer.pt`` into ``exp_avg_sq.safetensors`` (SPEC §4, ota).

OTA weighs each checkpoint by its Adam second moment ``v`` (``exp_avg_sq``), per parameter name. The
Trainer saves ``optimizer.state_dict()``, whose state is keyed by integer ids, not names: ids count up
through ``param_groups`` in order, and the Trainer's groups are (weight-decay params, then no-decay
params), each in ``named_parameters()`` order of the trainable params. So the names are recovered by
rebuilding that grouping, and every count and shape is checked, because a wrong guess would silently
attach one tensor's curvature to another.

Where the grouping comes from:

* By default, the model class named by ``config.json``'s ``architectures`` is built on the meta device
  (no weights, no network) and split the way the Trainer does. Two Trainer rules exist: since
  transformers 4.49 norm parameters are found by ``nn.LayerNorm`` type *and* by name (``bias``,
  ``layernorm``, ``rmsnorm``, a ``norm`` or ``*_norm`` module); before that only by type and ``bias``, so
  e.g. RMSNorm weights of many models were in the decay group. Both are tried; the one whose group sizes
  and shapes fit ``optimizer.pt`` is used, and if both fit differently the import refuses to choose.
* Without transformers, or when the caller passes ``param_names`` (the trainable names in
  ``named_parameters()`` order, e.g. for a frozen or PEFT-wrapped model), the split is by name only:
  biases and norm weights (a name containing ``bias`` or ``norm`` in any case, or a ``ln_*`` module, as
  GPT-2's ``ln_1``/``ln_f``) are no-decay. Tied weights are then unknown: each name is written only under
  itself.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mergeops import untrusted
from mergeops.errors import ModelFolderError, RejectedError, UntrustedFileError, UsageError
from mergeops.model import ModelFolder, TensorSpec
from mergeops.model.architectures import TRAINER_NO_DECAY, is_norm_or_bias
from mergeops.model.folder import CURVATURE_FILE
from mergeops.model.writer import write_tensor_file

OPTIMIZER_FILE = "optimizer.pt"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Param:
    """One trainable parameter as the optimizer saw it."""

    name: str  # its named_parameters() name
    shape: tuple[int, ...]
    stored_as: tuple[str, ...]  # the names model.safetensors holds it under (several when weights are tied)


@dataclass(frozen=True)
class _Layout:
    """The Trainer's two parameter groups under one grouping rule."""

    rule: str
    origin: str  # where the parameter list came from, for messages
    decay: tuple[_Param, ...]
    no_decay: tuple[_Param, ...]

    @property
    def ordered(self) -> tuple[_Param, ...]:
        return self.decay + self.no_decay


def import_trainer_curvature(checkpoint: Path, *, param_names: list[str] | None = None) -> Path:
    """Write ``checkpoint/exp_avg_sq.safetensors`` from ``checkpoint/optimizer.pt`` and return its path.

    The output holds one float32 tensor per trainable parameter, under the checkpoint's own tensor names
    and shapes. ``param_names`` overrides the parameter order otherwise rebuilt from ``config.json`` (see
    the module docstring). Raises :class:`ModelFolderError` for a missing file, :class:`RejectedError`
    when ``optimizer.pt`` does not fit the checkpoint, :class:`UsageError` when the order cannot be known.
    """
    root = Path(checkpoint)
    optimizer_path = root / OPTIMIZER_FILE
    if not os.path.lexists(optimizer_path):  # something else there is refused by the door, saying what it is
        raise ModelFolderError(f"{optimizer_path} does not exist; keep optimizer.pt in the checkpoint "
                               "(the Trainer writes it unless save_only_model=True) to import its curvature.")
    if param_names is None and not (root / "config.json").is_file():
        raise ModelFolderError(f"{root / 'config.json'} does not exist, so the parameter order of "
                               f"{optimizer_path} cannot be rebuilt; copy the model's config.json there or "
                               "pass param_names.")
    with ModelFolder.open(root) as folder:
        stored = {name: info.shape for name, info in folder.tensors.items()}
    groups, state = _load_optimizer(optimizer_path)
    if param_names is not None:
        layouts = [_layout_from_names(root, param_names, stored)]
    else:
        layouts = _layouts_from_config(root, stored)
    pairs = _choose(optimizer_path, layouts, groups, state)
    return _write(root / CURVATURE_FILE, optimizer_path, pairs, state, list(stored))


# -- reading optimizer.pt ----------------------------------------------------------------------------
def _load_optimizer(path: Path) -> tuple[list[list[int]], dict[int, dict[str, Any]]]:
    """The id groups and per-id state of a torch optimizer state_dict, structurally checked.

    Loaded weights-only (no code runs) and memory-mapped when possible, so tensors are paged in one by one.
    """
    try:
        with untrusted.open_binary(path) as handle:  # a FIFO or device there is refused, not waited on
            same_file = f"/proc/self/fd/{handle.fileno()}"  # torch reads the file the door opened, by name for mmap
            saved = torch.load(same_file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(same_file))
    except UntrustedFileError as exc:
        raise RejectedError(f"{exc}") from exc
    except pickle.UnpicklingError as exc:
        found = re.search(r"WeightsUnpickler error:\s*(.+?)(?: was not an allowed|\n|$)", str(exc))
        detail = found.group(1).strip() if found else _first_line(exc)
        raise RejectedError(f"{path} cannot be loaded as a weights-only torch file ({detail}): it is not a torch "
                            "file, or it holds objects other than tensors and plain values, which are refused "
                            "because loading them can run code; give the optimizer.pt a Trainer saved.") from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise RejectedError(f"{path} cannot be loaded as a weights-only torch file ({_first_line(exc)}); it is "
                            "damaged or not a torch file, give the optimizer.pt a Trainer saved.") from exc
    if not (isinstance(saved, dict) and isinstance(saved.get("state"), dict)
            and isinstance(saved.get("param_groups"), list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in saved["param_groups"])):
        raise RejectedError(f"{path} is not a torch optimizer state_dict (a dict with \"state\" and "
                            "\"param_groups\" whose entries list \"params\"); give the Trainer's optimizer.pt.")
    groups = [list(g["params"]) for g in saved["param_groups"]]
    ids = [i for g in groups for i in g]
    if not all(isinstance(i, int) for i in ids) or len(set(ids)) != len(ids):
        raise RejectedError(f"{path} has param_groups whose \"params\" are not distinct integer ids; the file is "
                            "damaged or was not written by optimizer.state_dict().")
    state: dict[int, dict[str, Any]] = saved["state"]
    unknown = sorted(set(state) - set(ids), key=str)
    if unknown:
        raise RejectedError(f"{path} has state for parameter id {unknown[0]!r}, which no param_group lists; the "
                            "file is damaged or was not written by optimizer.state_dict().")
    for pid in ids:
        entry = state.get(pid)
        if entry is not None and not isinstance(entry.get("exp_avg_sq") if isinstance(entry, dict) else None,
                                                torch.Tensor):
            held = ", ".join(sorted(map(str, entry))) if isinstance(entry, dict) else type(entry).__name__
            raise RejectedError(f"{path} has no exp_avg_sq for parameter id {pid} (its state holds: {held}), so "
                                "it was not written by Adam/AdamW and has no second moment to import; OTA needs "
                                "checkpoints trained with an Adam-type optimizer.")
    if ids and not any(pid in state for pid in ids):
        raise RejectedError(f"{path} has no optimizer state at all (no exp_avg_sq for any parameter); save the "
                            "checkpoint after at least one optimizer step with Adam/AdamW.")
    if len(saved["param_groups"]) == 2 and saved["param_groups"][1].get("weight_decay", 0.0) != 0.0:
        raise RejectedError(f"{path} has weight_decay={saved['param_groups'][1]['weight_decay']} in its second "
                            "param_group, but the Trainer's second group (biases and norms) always has 0.0; it "
                            "was not written by a Hugging Face Trainer, so its parameter order is unknown.")
    return groups, state


# -- the Trainer's parameter grouping ------------------------------------------------------------------
def _layouts_from_config(root: Path, stored: Mapping[str, tuple[int, ...]]) -> list[_Layout]:
    """Both Trainer grouping rules for the model ``config.json`` describes, built without weights."""
    try:
        import transformers
    except ImportError:
        raise UsageError(f"transformers is not installed, so the parameter order of {root / OPTIMIZER_FILE} "
                         "cannot be rebuilt from config.json; install transformers or pass param_names "
                         "(the trainable parameter names in named_parameters() order).") from None
    model = _meta_model(transformers, root)
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    trainable: list[tuple[str, _Param]] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        shape = tuple(param.shape)
        stored_as = tuple(n for n in aliases[id(param)] if n in stored)
        if not stored_as:
            raise RejectedError(f"parameter {name!r} of the model built from {root / 'config.json'} is not a tensor "
                                f"in {root}'s weights; config.json and the weights disagree, fix the checkpoint "
                                "or pass param_names.")
        for alias in stored_as:
            if stored[alias] != shape:
                raise RejectedError(f"tensor {alias!r} in {root}'s weights has shape {stored[alias]} but "
                                    f"{root / 'config.json'} builds it as {shape}; config.json and the weights "
                                    "disagree.")
        trainable.append((name, _Param(name, shape, stored_as)))
    current = set(_decay_parameter_names(model, TRAINER_NO_DECAY))
    legacy = {n for n in _decay_parameter_names(model, ()) if "bias" not in n}
    origin = f"the {type(model).__name__} built from {root / 'config.json'}"
    return [_split("transformers >= 4.49 Trainer", origin, trainable, current),
            _split("transformers < 4.49 Trainer", origin, trainable, legacy)]


def _meta_model(transformers: Any, root: Path) -> nn.Module:
    """The config's architecture with parameters on the meta device: names, shapes, ties, no memory."""
    config_path = root / "config.json"
    try:
        config = transformers.AutoConfig.from_pretrained(root)
    except Exception as exc:
        raise RejectedError(f"{config_path} cannot be read by transformers ({_first_line(exc)}); fix it or pass "
                            "param_names.") from exc
    architectures = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, architectures[0], None) if len(architectures) == 1 else None
    if model_class is None:
        raise RejectedError(f"{config_path} names architectures {architectures!r}, which is not exactly one model "
                            f"class of the installed transformers {transformers.__version__}; pass param_names "
                            "with the trainable parameter names in named_parameters() order.")
    try:
        with torch.device("meta"):
            return model_class(config)
    except Exception as exc:
        raise RejectedError(f"{architectures[0]} cannot be built from {config_path} ({_first_line(exc)}); pass "
                            "param_names with the trainable parameter names in named_parameters() order.") from exc


def _decay_parameter_names(module: nn.Module, patterns: Iterable[re.Pattern[str]]) -> list[str]:
    """transformers' ``get_parameter_names(module, [nn.LayerNorm], patterns)``, as the Trainer calls it.

    Re-implemented rather than imported so that both the old and the new rule are available whatever
    transformers is installed: the checkpoint may come from another version.
    """
    patterns = tuple(patterns)
    names: list[str] = []
    for child_name, child in module.named_children():
        if isinstance(child, nn.LayerNorm):
            continue
        for name in _decay_parameter_names(child, patterns):
            full = f"{child_name}.{name}"
            if not any(p.search(full.lower()) for p in patterns):
                names.append(full)
    names += [k for k in module._parameters if not any(p.search(k.lower()) for p in patterns)]
    return names


def _split(rule: str, origin: str, trainable: list[tuple[str, _Param]], decay_names: set[str]) -> _Layout:
    """Trainer.create_optimizer: decay params, then the rest, each in named_parameters() order."""
    return _Layout(rule, origin, tuple(p for n, p in trainable if n in decay_names),
                   tuple(p for n, p in trainable if n not in decay_names))


def _layout_from_names(root: Path, param_names: list[str], stored: Mapping[str, tuple[int, ...]]) -> _Layout:
    """The caller's explicit order, split by name (biases and norms are no-decay)."""
    if isinstance(param_names, str) or not all(isinstance(n, str) for n in param_names):
        raise UsageError("param_names must be a list of parameter names (strings) in named_parameters() order.")
    seen: set[str] = set()
    for name in param_names:
        if name in seen:
            raise UsageError(f"param_names lists {name!r} twice; give each trainable parameter once, in "
                             "named_parameters() order.")
        seen.add(name)
        if name not in stored:
            raise RejectedError(f"param_names lists {name!r}, which is not a tensor in {root}'s weights; use the "
                                "checkpoint's tensor names.")
    params = [(n, _Param(n, stored[n], (n,))) for n in param_names]
    return _split("name-based", "param_names", params, {n for n in param_names if not is_norm_or_bias(n)})


def _choose(path: Path, layouts: list[_Layout], groups: list[list[int]], state: Mapping[int, Mapping[str, Any]]
            ) -> list[tuple[int, _Param]]:
    """Pair each optimizer id with its parameter under the one layout that fits; otherwise say why not."""
    n_ids = sum(map(len, groups))
    n_params = len(layouts[0].ordered)
    if n_ids != n_params:
        raise RejectedError(f"{path} holds {n_ids} parameters but {layouts[0].origin} has {n_params} trainable "
                            "parameters; it belongs to another model, or some parameters were frozen (then pass "
                            "param_names with the trainable names in named_parameters() order).")
    if len(groups) != 2:
        raise RejectedError(f"{path} has {len(groups)} param_groups, but the Trainer writes exactly two (weight "
                            "decay, then biases and norms); it was not written by a Hugging Face Trainer, so its "
                            "parameter order is unknown.")
    ids = groups[0] + groups[1]
    fits: list[tuple[_Layout, list[tuple[int, _Param]]]] = []
    problems: list[tuple[int, str]] = []  # (how far the layout got, why it failed)
    for layout in layouts:
        sizes = (len(layout.decay), len(layout.no_decay))
        if (len(groups[0]), len(groups[1])) != sizes:
            problems.append((0, f"{path} has param_groups of {len(groups[0])} and {len(groups[1])} parameters, but "
                            f"the {layout.rule} grouping splits {layout.origin} into {sizes[0]} with weight decay "
                            f"and {sizes[1]} without (biases and norms), so its parameter order is unknown; was "
                            "the optimizer customised?"))
            continue
        pairs = list(zip(ids, layout.ordered, strict=True))
        mismatch = next(((pid, p) for pid, p in pairs
                         if pid in state and tuple(state[pid]["exp_avg_sq"].shape) != p.shape), None)
        if mismatch is not None:
            pid, param = mismatch
            problems.append((1, f"{path} has exp_avg_sq of shape {tuple(state[pid]['exp_avg_sq'].shape)} for parameter "
                            f"{param.name!r}, whose shape is {param.shape} (id {pid} under the {layout.rule} "
                            "grouping); the optimizer state belongs to another model, copy the matching one"))
            continue
        fits.append((layout, pairs))
    if not fits:
        furthest = max(problems, key=lambda p: p[0])[1]  # max keeps the first of equals: the newest rule
        raise RejectedError(f"{furthest}.")
    orders = {tuple(p.name for _, p in pairs) for _, pairs in fits}
    if len(orders) > 1:
        raise RejectedError(f"{path} fits both the {fits[0][0].rule} and the {fits[1][0].rule} parameter grouping, "
                            "which order the parameters differently; pass param_names to say which is right.")
    log.debug("%s: parameter ids mapped with the %s grouping", path, fits[0][0].rule)
    return fits[0][1]


# -- writing ----------------------------------------------------------------------------------------
def _write(out: Path, source: Path, pairs: list[tuple[int, _Param]], state: Mapping[int, Mapping[str, Any]],
           file_order: list[str]) -> Path:
    """Stream every exp_avg_sq as float32 into ``out``, atomically.

    A parameter the optimizer never stepped (no state entry: it never had a gradient) has exp_avg_sq 0,
    which is exactly what Adam would hold, so zeros are written and the names logged.
    """
    by_name = {name: (pid, p) for pid, p in pairs for name in p.stored_as}
    names = [n for n in file_order if n in by_name]
    never_stepped = sorted({p.name for pid, p in pairs if pid not in state})
    if never_stepped:
        log.warning("%s has no optimizer state for %d parameter(s) (e.g. %r): they never had a gradient, so their "
                    "exp_avg_sq is written as zeros", source, len(never_stepped), never_stepped[0])
    specs = [TensorSpec(n, torch.float32, by_name[n][1].shape) for n in names]
    write_tensor_file(out, specs, lambda spec: _second_moment(source, *by_name[spec.name], state),
                      {"mergeops.source": OPTIMIZER_FILE})
    return out


def _second_moment(source: Path, pid: int, param: _Param, state: Mapping[int, Mapping[str, Any]]) -> torch.Tensor:
    """One parameter's exp_avg_sq as float32, refusing values a second moment cannot have."""
    entry = state.get(pid)
    if entry is None:
        return torch.zeros(param.shape, dtype=torch.float32)
    value = entry["exp_avg_sq"]
    if not value.dtype.is_floating_point:
        raise RejectedError(f"{source} has a {value.dtype} exp_avg_sq for parameter {param.name!r}; a second "
                            "moment is floating point, the file is damaged.")
    value = value.to(torch.float32)
    if not bool(torch.isfinite(value).all()) or bool((value < 0).any()):
        raise RejectedError(f"{source} has negative, NaN or Inf values in exp_avg_sq for parameter {param.name!r}; "
                            "the training run diverged or the file is damaged, so it has no usable curvature.")
    return value


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
