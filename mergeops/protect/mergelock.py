"""MergeLock: make a model unmergeable while it computes exactly the same function (SPEC §8).

``protect`` streams a model folder tensor by tensor into a new folder: every attention layer's q/k/v/o
(only one layer's in memory at a time) gets a secret per-group transform (see :mod:`.heads`) derived from
the lock key (see :mod:`.matrices`); every other tensor is copied through unchanged. ``unprotect`` with
the same key writes the original weights back. Both write atomically through :class:`ModelWriter`.

The report each returns is what ``mergeops protect --json`` prints; its ``"ledger"`` entry is the payload
of the ``protection.recorded`` ledger event.
"""

from __future__ import annotations

import hmac
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mergeops import __version__
from mergeops.errors import MergeopsError, UsageError
from mergeops.keys import LOCK_KEY_BYTES, lock_key_fingerprint
from mergeops.ledger.card import read_license
from mergeops.model import ModelFolder, ModelWriter, TensorSpec, folder_digest
from mergeops.model.digest import digest_of_listing
from mergeops.protect import checks
from mergeops.protect.architectures import AttentionUnit, Plan, resolve
from mergeops.protect.heads import HeadWeights, load, store, transform
from mergeops.protect.matrices import CONDITION, SALT_BYTES, SCHEME, Invertible, check_tag, qk_block, vo_block
from mergeops.threads import one_torch_thread

VERSION = "1"
META = "mergelock."  # every metadata key MergeLock adds starts with this


def protect(model_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], lock_key: bytes, *,
            verify: bool = False, anchor: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Write a MergeLock-protected copy of ``model_dir`` to ``out_dir`` (which must not exist).

    ``verify``: also run original and protected through transformers (when installed) and compare outputs.
    ``anchor``: a model the residual-risk attack uses as its anchor (the public base model, same layout);
    without it the attack uses a stand-in, this model plus 5% relative noise per tensor.
    Raises UsageError (nothing written) for an unsupported architecture, an already protected model or a
    bad key, and MergeopsError (nothing left behind) if the protected model does not compute the same
    function.
    """
    source, out = Path(model_dir), Path(out_dir)
    _check_key(lock_key)
    _check_out(out)
    with ModelFolder.open(source) as src:
        metadata = _metadata(src)
        if metadata.get(f"{META}scheme"):
            raise UsageError(f"{source} is already MergeLock-protected ({metadata[f'{META}scheme']}); protect the "
                             "original model instead, or `mergeops unprotect` it first. Nothing was written.")
        plan = resolve(src)
        anchor_folder = _open_anchor(anchor, plan, src) if anchor is not None else None
        salt = os.urandom(SALT_BYTES)
        metadata |= {f"{META}scheme": SCHEME, f"{META}version": VERSION, f"{META}salt": salt.hex(),
                     f"{META}check": check_tag(lock_key, salt), f"{META}condition": repr(CONDITION),
                     f"{META}family": plan.family.name, f"{META}qk": _qk_record(plan),
                     f"{META}tool": f"mergeops {__version__}"}
        measured = checks.Measurements(
            anchor_label=f"given model {anchor}" if anchor is not None else
            f"stand-in for the base model: this model plus {checks.PROXY_ANCHOR_NOISE:.0%} relative Gaussian noise")
        attacked = _attack_sample(plan)
        dtype = _attention_dtype(src, plan)
        source_digest = folder_digest(source)
        license_id = read_license(source)

        def per_unit(unit: AttentionUnit, orig: HeadWeights, written: HeadWeights) -> None:
            measured.add(unit, orig, written)
            if unit.label in attacked:
                anchor_w = load(unit, anchor_folder.read) if anchor_folder else checks.proxy_anchor(unit, orig)
                measured.add_attack(unit, orig, written, anchor_w)

        def card(digest: str) -> str:
            return _protected_card(source_digest, digest, plan, measured, license_id)

        try:
            hashes, changed = _rewrite(src, out, plan, metadata, lock_key, salt, CONDITION, inverse=False,
                                       per_unit=per_unit, card=card, gate=lambda: _invariants_gate(measured, dtype))
        finally:
            if anchor_folder is not None:
                anchor_folder.close()
    output_digest = digest_of_listing(hashes)
    report: dict[str, Any] = {
        "scheme": SCHEME, "version": VERSION, "source": str(source), "output": str(out),
        "source_digest": source_digest, "output_digest": output_digest,
        "key_fingerprint": lock_key_fingerprint(lock_key),
        "architecture": plan.architecture, "family": plan.family.label, **_geometry(plan),
        "branches": ["qk", "vo"] if plan.qk else ["vo"], "notes": list(plan.notes),
        "tensors_changed": changed, "tensors_total": len(src.tensors), "dtype": str(dtype).removeprefix("torch."),
        "movement": measured.movement_report(),
        "function_check": {"invariants": _invariants_report(measured, dtype), "forward": None},
        "residual_risk": measured.attack_report(),
    }
    if verify:
        forward = checks.forward_check(source, out, plan, src.config or {}, dtype)
        report["function_check"]["forward"] = forward
        if forward.get("ran") and not forward["passed"]:
            shutil.rmtree(out, ignore_errors=True)
            raise MergeopsError(f"the protected copy of {source} does not compute the same function (max relative "
                                f"output error {forward['max_relative_error']:.2e} > {forward['tolerance']:.0e}); it "
                                "was removed. Report this as a bug with the model's config.json.")
    report["ledger"] = {"source_digest": source_digest, "output_digest": output_digest, "path": str(out),
                        "key_fingerprint": report["key_fingerprint"], "scheme": SCHEME}
    return report


def unprotect(model_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], lock_key: bytes) -> dict[str, Any]:
    """Write the original weights of the MergeLock-protected ``model_dir`` to ``out_dir``.

    Raises UsageError (nothing written) when the model is not protected, or was protected with another key.
    """
    source, out = Path(model_dir), Path(out_dir)
    _check_key(lock_key)
    _check_out(out)
    with ModelFolder.open(source) as src:
        metadata = _metadata(src)
        scheme = metadata.get(f"{META}scheme")
        if scheme is None:
            raise UsageError(f"{source} is not MergeLock-protected (its safetensors metadata has no {META}scheme); "
                             "there is nothing to unprotect.")
        if scheme != SCHEME or metadata.get(f"{META}version") != VERSION:
            raise UsageError(f"{source} was protected with {scheme} version {metadata.get(f'{META}version')}, "
                             f"which this mergeops ({SCHEME} version {VERSION}) cannot undo; use the mergeops that "
                             "protected it.")
        try:
            salt = bytes.fromhex(metadata[f"{META}salt"])
            condition = float(metadata[f"{META}condition"])
            tag = metadata[f"{META}check"]
        except (KeyError, ValueError) as exc:
            raise UsageError(f"{source} has damaged MergeLock metadata ({exc}); it cannot be unprotected.") from None
        if not hmac.compare_digest(check_tag(lock_key, salt), tag):
            raise UsageError(f"{source} was protected with a different lock key than the one given (key "
                             f"{lock_key_fingerprint(lock_key)}); use the lock key it was protected with. "
                             "Nothing was written.")
        plan = resolve(src)
        if metadata.get(f"{META}family") != plan.family.name or metadata.get(f"{META}qk") != _qk_record(plan):
            raise UsageError(f"{source}'s MergeLock record (family {metadata.get(f'{META}family')}, "
                             f"q/k {metadata.get(f'{META}qk')}) does not match its config.json and tensors "
                             f"({plan.family.name}, {_qk_record(plan)}); was config.json changed? Nothing was written.")
        restored = {k: v for k, v in metadata.items() if not k.startswith(META)}
        source_digest = folder_digest(source)
        moved: list[float] = []

        def per_unit(unit: AttentionUnit, prot: HeadWeights, written: HeadWeights) -> None:
            moved.extend(checks.relative_change(written.role(r), prot.role(r)) for r in ("q", "k", "v", "o"))  # type: ignore[arg-type]

        def card(digest: str) -> str:
            return _restored_card(source_digest, digest)

        hashes, changed = _rewrite(src, out, plan, restored, lock_key, salt, condition, inverse=True,
                                   per_unit=per_unit, card=card, gate=None)
    return {"scheme": SCHEME, "source": str(source), "output": str(out), "source_digest": source_digest,
            "output_digest": digest_of_listing(hashes), "key_fingerprint": lock_key_fingerprint(lock_key),
            "architecture": plan.architecture, "family": plan.family.label, "tensors_changed": changed,
            "tensors_total": len(src.tensors), "mean_relative_change": sum(moved) / len(moved) if moved else 0.0}


def is_protected(model_dir: str | os.PathLike[str]) -> bool:
    """Whether ``model_dir``'s weights carry MergeLock metadata."""
    with ModelFolder.open(model_dir) as src:
        return bool(_metadata(src).get(f"{META}scheme"))


# -- the streaming rewrite ---------------------------------------------------------------------------
def _rewrite(src: ModelFolder, out: Path, plan: Plan, metadata: Mapping[str, str], lock_key: bytes, salt: bytes,
             condition: float, *, inverse: bool, per_unit: Any, card: Any, gate: Any) -> tuple[dict[str, str], int]:
    """Copy ``src`` to ``out`` tensor by tensor, transforming each attention unit when its first tensor
    comes up; ``gate`` runs before the folder is committed and may raise to abandon it."""
    unit_of = {name: unit for unit in plan.units for name in unit.tensor_names}
    specs = [TensorSpec(name, info.dtype, info.shape) for name, info in src.tensors.items()]
    dtypes = {name: info.dtype for name, info in src.tensors.items()}
    writer = ModelWriter(out, specs, metadata=metadata, donor=src.path)
    writer.finalize = lambda hashes: {"README.md": card(digest_of_listing(hashes)).encode()}
    done: set[str] = set()
    changed = 0
    with writer, one_torch_thread():
        for name in writer.layout_order:
            if name in done:
                continue
            unit = unit_of.get(name)
            if unit is None:
                writer.write(name, src.read(name))
                done.add(name)
                continue
            orig = load(unit, src.read)
            qk, vo = _blocks(unit, lock_key, salt, condition)
            tensors = store(unit, transform(unit, orig, qk, vo, inverse=inverse), dtypes)
            per_unit(unit, orig, load(unit, tensors.__getitem__))
            for tensor_name, tensor in tensors.items():
                writer.write(tensor_name, tensor)
                done.add(tensor_name)
            changed += len(_changed_names(unit))
        if gate is not None:
            gate()
    return writer.file_hashes, changed


def _changed_names(unit: AttentionUnit) -> set[str]:
    roles = ("q", "k", "v", "o", "q_bias", "k_bias", "v_bias") if unit.qk else ("v", "o", "v_bias")
    return {unit.names[r] for r in roles if r in unit.names}


def _blocks(unit: AttentionUnit, lock_key: bytes, salt: bytes, c: float
            ) -> tuple[list[Invertible] | None, list[Invertible]]:
    d = unit.head_dim
    qk = [qk_block(lock_key, salt, unit.label, g, d, unit.rotary_dim, unit.family.rotary, c)
          for g in range(unit.kv_heads)] if unit.qk else None
    return qk, [vo_block(lock_key, salt, unit.label, g, d, c) for g in range(unit.kv_heads)]


# -- helpers -----------------------------------------------------------------------------------------
def _check_key(lock_key: bytes) -> None:
    if not isinstance(lock_key, bytes) or len(lock_key) != LOCK_KEY_BYTES:
        raise UsageError(f"a MergeLock key is exactly {LOCK_KEY_BYTES} random bytes (got "
                         f"{len(lock_key) if isinstance(lock_key, bytes) else type(lock_key).__name__}); "
                         "create one with `mergeops keygen --out DIR`.")


def _check_out(out: Path) -> None:
    if out.exists():
        raise UsageError(f"{out} already exists; model folders are never overwritten, so choose a new --out DIR.")


def _metadata(src: ModelFolder) -> dict[str, str]:
    first = next(iter(src.headers.values()))
    return {k: v for k, v in first.metadata.items() if k != "format"}


def _qk_record(plan: Plan) -> str:
    skipped = [u.label for u in plan.units if not u.qk]
    if not skipped:
        return "all"
    return "none" if len(skipped) == len(plan.units) else ";".join(skipped)


def _attack_sample(plan: Plan) -> set[str]:
    units = plan.units
    if len(units) <= checks.ATTACK_LAYERS:
        return {u.label for u in units}
    step = (len(units) - 1) / (checks.ATTACK_LAYERS - 1)
    return {units[round(i * step)].label for i in range(checks.ATTACK_LAYERS)}


def _attention_dtype(src: ModelFolder, plan: Plan) -> torch.dtype:
    """The narrowest dtype any attention weight is stored in (it sets the precision bar)."""
    return min((src.tensors[n].dtype for u in plan.units for n in u.tensor_names), key=lambda d: d.itemsize)


def _open_anchor(anchor: str | os.PathLike[str], plan: Plan, src: ModelFolder) -> ModelFolder:
    folder = ModelFolder.open(anchor)
    for unit in plan.units:
        for name in unit.tensor_names:
            info = folder.tensors.get(name)
            if info is None or info.shape != src.tensors[name].shape:
                folder.close()
                raise UsageError(f"anchor model {anchor} does not match {src.path}: tensor {name!r} is "
                                 f"{'missing' if info is None else f'shaped {info.shape}'}; give the base model of "
                                 "the same architecture. Nothing was written.")
    return folder


def _invariants_gate(measured: checks.Measurements, dtype: torch.dtype) -> None:
    report = _invariants_report(measured, dtype)
    if not report["passed"]:
        raise MergeopsError(f"MergeLock self-check failed: a head's attention changed by "
                            f"{report['max_relative_error']:.2e} (tolerance {report['tolerance']:.0e}); nothing was "
                            "written. Report this as a bug.")


def _invariants_report(measured: checks.Measurements, dtype: torch.dtype) -> dict[str, Any]:
    worst = max(measured.invariant.values())
    limit = checks.tolerance(dtype)
    return {"what": "per head: q·k logits (per rotary pair under RoPE) and Wo·Wv outputs on random probes",
            "qk_max_relative_error": measured.invariant["qk"], "vo_max_relative_error": measured.invariant["vo"],
            "max_relative_error": worst, "tolerance": limit, "passed": worst <= limit}


def _geometry(plan: Plan) -> dict[str, Any]:
    first = plan.units[0]
    towers = sorted({u.tower for u in plan.units if u.tower})
    return {"towers": towers, "layers": len(plan.units), "heads": first.heads, "kv_heads": first.kv_heads,
            "head_dim": first.head_dim,
            "rotary": f"{first.family.rotary} pairs over {first.rotary_dim} dims" if first.rotary_dim else None}


def _protected_card(source_digest: str, digest: str, plan: Plan, measured: checks.Measurements,
                    license_id: str | None) -> str:
    movement = measured.movement_report()
    risk = measured.attack_report()
    front = ["---", "tags:", "- mergeops", "- mergelock", "- protected"]
    if license_id:
        front.append(f"license: {license_id}")
    front.append("---")
    notes = "\n" + "".join(f"\n- {n}" for n in plan.notes) if plan.notes else ""
    branches = "query/key and value/output" if plan.qk else "value/output"
    body = f"""
# MergeLock-protected model

`{digest}` is a MergeLock-protected copy of `{source_digest}` ({plan.family.label}, {plan.architecture}).

It computes the same function as the original: in every attention layer each head's {branches}
weights were multiplied by secret invertible matrices that cancel inside the head, so every
output is unchanged up to floating-point rounding. Its weights, however, sit far from every other fine-tune of
the same base model (attention weights moved by {movement['min']:.0%} or more), so averaging or otherwise
merging it with them in weight space produces a broken model.{notes}

Use it like the original (same config, tokenizer and code). Fine-tuning it works as usual.

Residual risk: {risk.get('summary', 'not measured')}.

The lock key is not in this folder; its owner can restore the original weights with `mergeops unprotect`.
Scheme: {SCHEME}, recorded in the weights' metadata (`{META}*`).
"""
    return "\n".join(front) + "\n" + body


def _restored_card(source_digest: str, digest: str) -> str:
    return ("---\ntags:\n- mergeops\n---\n\n# Restored model\n\n"
            f"`{digest}` holds the original weights of the MergeLock-protected model `{source_digest}`, restored by "
            "its owner with `mergeops unprotect`.\n")


def describe_protection(report: Mapping[str, Any]) -> str:
    """One line for humans from a :func:`protect` report."""
    fc = report["function_check"]
    err = (fc["forward"] or {}).get("max_relative_error", fc["invariants"]["max_relative_error"])
    return (f"protected {report['family']} ({report['layers']} layers, {report['tensors_changed']} tensors changed): "
            f"attention moved ≥{report['movement']['min']:.0%}, outputs equal within {err:.1e}; "
            f"{report['residual_risk'].get('summary', '')}")


__all__ = ["describe_protection", "is_protected", "protect", "unprotect"]
