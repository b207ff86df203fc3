"""Where a checkpoint is validated: structure (via ModelFolder.scan), values, and fit to a base."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import PurePosixPath

import torch

from mergeops.model import ModelFolder, Problem
from mergeops.model.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, Adapter
from mergeops.model.architectures import family_for, is_buffer, is_parameter, is_vocab, tied_weights

MERGELOCK_META = "mergelock."  # the safetensors metadata keys of a MergeLock-protected model start with this

_FINITE_CHUNK = 1 << 20  # elements: isfinite allocates temporaries of the input's size


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite, using memory of one small chunk rather than of the tensor."""
    return all(bool(torch.isfinite(chunk).all()) for chunk in tensor.reshape(-1).split(_FINITE_CHUNK))


def tensor_value_problem(name: str, tensor: torch.Tensor, file: str | None = None,
                         expect_floating: bool | None = None) -> Problem | None:
    """A problem with one tensor's values: non-finite entries, or an integer where a float belongs.

    ``expect_floating`` comes from the base when there is one; otherwise from the tensor's name (trainable
    parameters are floating point; buffers such as BERT's ``position_ids`` are legitimately integer).
    """
    if expect_floating is None:
        expect_floating = is_parameter(name)
    if not tensor.dtype.is_floating_point:
        if expect_floating:
            return Problem("not_floating", f"tensor {name!r} is {str(tensor.dtype).removeprefix('torch.')} "
                           "where a floating-point tensor is expected; save the weights in a float dtype.",
                           file, name)
        return None
    if not all_finite(tensor):
        bad = int((~torch.isfinite(tensor)).sum())
        kinds = "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
        if kinds == "NaN" and bool(torch.isinf(tensor).any()):
            kinds = "NaN and Inf"
        return Problem("non_finite", f"tensor {name!r} has {bad} non-finite value(s) ({kinds}); the checkpoint "
                       "is corrupted or training diverged, so it cannot be merged.", file, name)
    return None


def protection_marks(folder: ModelFolder) -> dict[str, str] | None:
    """The MergeLock marks (scheme, version, strength, ...) in a model folder's weights metadata, or None."""
    metadata = next(iter(folder.headers.values())).metadata if folder.headers else {}
    found = {k.removeprefix(MERGELOCK_META): v for k, v in metadata.items()
             if k.startswith(MERGELOCK_META) and k != f"{MERGELOCK_META}header"}
    return found if found.get("scheme") else None


def problems_against_base(checkpoint: ModelFolder, base: ModelFolder, tied: Collection[str] = ()) -> list[Problem]:
    """Header-level fit to the base: same tensor names and shapes, floats where the base has floats,
    same architecture. Values are checked while folding, so each tensor is read once. ``tied``: base tensors the
    checkpoint holds as its input embeddings. A vocabulary-sized tensor may have another number of rows (tokens
    added: intake's vocabulary check decides)."""
    problems: list[Problem] = []
    if base.config is not None and checkpoint.config is None:
        problems.append(Problem("missing_config", f"{checkpoint.path} has no config.json, which its base has, so its "
                                "architecture cannot be checked; copy the training run's config.json into it.",
                                "config.json"))
    base_arch, arch = base.architecture, checkpoint.architecture
    if base_arch and arch and base_arch != arch:
        problems.append(Problem("architecture_mismatch", f"{checkpoint.path} is a {arch} but the base is a "
                                f"{base_arch}; only fine-tunes of the stream's base can be merged.",
                                "config.json"))
    missing = [n for n in base.tensors if n not in checkpoint.tensors and not is_buffer(n)  # buffers: the base's
               and n not in tied]
    extra = [n for n in checkpoint.tensors if n not in base.tensors]
    tied_by_base = tied_weights(base.config)
    untied = [n for n in extra if n in tied_by_base]  # the reverse of a tied checkpoint: the merge has no room for it
    extra = [n for n in extra if n not in tied_by_base]
    if untied:
        problems.append(Problem("untied_tensor", f"{checkpoint.path} stores {untied[0]!r}, which the base ties to "
                                f"{tied_by_base[untied[0]]!r} and does not store; a merge, tied like its base, cannot "
                                "hold a separate matrix: fine-tune with the base's tie_word_embeddings.",
                                checkpoint.tensors[untied[0]].file, untied[0]))
    if missing:
        problems.append(Problem("missing_tensor", f"{checkpoint.path} lacks {len(missing)} tensor(s) of the "
                                f"base, first {missing[0]!r}; was it saved from a different model or "
                                "only partly (e.g. an adapter)?", None, missing[0]))
    if extra:
        problems.append(Problem("unexpected_tensor", f"{checkpoint.path} has {len(extra)} tensor(s) the base "
                                f"lacks, first {extra[0]!r}; it is not a fine-tune of this base.",
                                checkpoint.tensors[extra[0]].file, extra[0]))
    for name, info in checkpoint.tensors.items():
        ref = base.tensors.get(name)
        if ref is None:
            continue
        resized = is_vocab(name) and len(info.shape) == len(ref.shape) >= 1 and info.shape[1:] == ref.shape[1:]
        if info.shape != ref.shape and not resized:
            problems.append(Problem("shape_mismatch", f"tensor {name!r} has shape {list(info.shape)} in "
                                    f"{checkpoint.path} but {list(ref.shape)} in the base.", info.file, name))
        elif ref.dtype.is_floating_point and not info.dtype.is_floating_point:
            problems.append(Problem("not_floating", f"tensor {name!r} is {info.entry.dtype} in "
                                    f"{checkpoint.path} but floating point ({ref.entry.dtype}) in the base; "
                                    "save the weights in a float dtype.", info.file, name))
    return problems


def names_of(base: ModelFolder) -> set[str]:
    """The names a base model is known by: its folder's path and name, and the ``_name_or_path`` in its config."""
    known = {str(base.path), str(base.path.resolve()), base.path.resolve().name}
    recorded = (base.config or {}).get("_name_or_path")
    if isinstance(recorded, str) and recorded:
        known.add(recorded.rstrip("/"))
    return known


def adapter_problems_against_base(adapter: Adapter, base: ModelFolder) -> list[Problem]:
    """Fit of a LoRA adapter to the base: it names the base, and every pair of factors updates a floating 2-D tensor
    of the base in that tensor's shape. Factor values are checked when they are read."""
    problems: list[Problem] = []
    named = adapter.settings.base_model
    known = names_of(base)
    family = family_for(base.config)
    if not named:
        problems.append(Problem("adapter_base", f"{adapter.path / ADAPTER_CONFIG} names no base model "
                                "(base_model_name_or_path); set it to the base the adapter was trained on "
                                f"({base.path.resolve().name}).", ADAPTER_CONFIG))
    elif named.rstrip("/") not in known and PurePosixPath(named.rstrip("/")).name != base.path.resolve().name:
        problems.append(Problem("adapter_base", f"{adapter.path} is an adapter of {named!r}, but the stream's base is "
                                f"{base.path} (known as {', '.join(sorted(repr(k) for k in known))}); only adapters "
                                "trained on the stream's base can be merged.", ADAPTER_CONFIG))
    for tensor, copy in adapter.base_copies.items():  # PEFT's save_embedding_layers: harmless only if unchanged
        info = base.tensors.get(tensor)
        if info is None or adapter.folder.tensors[copy].shape != info.shape or not torch.equal(
                adapter.folder.read(copy), base.read(tensor).to(adapter.folder.tensors[copy].dtype)):
            problems.append(Problem("replaced_base_weight", f"{adapter.path / ADAPTER_WEIGHTS} holds {copy!r}, a "
                                    f"replacement of the base's {tensor!r} that differs from it (resized or retrained "
                                    "embeddings); only adapters of the unchanged base can be merged.",
                                    ADAPTER_WEIGHTS, copy))
    for tensor, target in adapter.targets.items():
        info = base.tensors.get(tensor)
        factor = adapter.folder.tensors[target.a]
        if info is None:
            problems.append(Problem("unknown_target", f"{adapter.path / ADAPTER_WEIGHTS} adapts module "
                                    f"{target.module!r}, but the base has no tensor {tensor!r}; the adapter belongs "
                                    "to a different model.", ADAPTER_WEIGHTS, target.a))
        elif not info.dtype.is_floating_point or len(info.shape) != 2:
            problems.append(Problem("unknown_target", f"{adapter.path / ADAPTER_WEIGHTS} adapts {tensor!r}, which "
                                    f"is {info.entry.dtype} {list(info.shape)} in the base, not a 2-D floating weight.",
                                    ADAPTER_WEIGHTS, target.a))
        elif (shape := adapter.update_shape(tensor, family)) != info.shape:
            embedding = " (adapted as an embedding)" if target.embedding else ""
            problems.append(Problem("shape_mismatch", f"LoRA factors of {target.module!r} in {adapter.path} make an "
                                    f"update of shape {list(shape)}{embedding} but the base's {tensor!r} is "
                                    f"{list(info.shape)}; the adapter belongs to a different model.",
                                    factor.file, target.a))
    return problems
