"""MergeLock: make a model unmergeable while it computes exactly the same function (SPEC §8).

``protect`` streams a model folder into a new folder, one layer at a time: every layer's attention and MLP
tensors get secret, exact maps (see :mod:`.transforms`: whole heads reordered, signed permutations and powers of
two inside each head and across MLP neurons) derived from the lock key; every other tensor and file is copied
through unchanged. The weights files keep their source's layout byte for byte, with the source's own headers
kept in the metadata, so ``unprotect`` with the same key writes back every original file byte for byte.

The report each returns is what ``mergeops protect --json`` prints; its ``"ledger"`` entry is the payload
of the ``protection.recorded`` ledger event, which ``record_protection`` records.
"""

from __future__ import annotations

import base64
import dataclasses
import hmac
import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mergeops import __version__, untrusted
from mergeops.attestation import IN_TOTO_STATEMENT
from mergeops.durable import fsync_dir
from mergeops.errors import MergeopsError, UntrustedFileError, UsageError
from mergeops.intake.validate import MERGELOCK_META, protection_marks
from mergeops.keys import LOCK_KEY_BYTES, lock_key_fingerprint
from mergeops.ledger.kinds import ProtectionRecorded
from mergeops.ledger.store import Ledger, writing
from mergeops.model import ModelFolder, ModelWriter, TensorSpec, folder_digest
from mergeops.model.digest import digest_of_listing, folder_file_hashes
from mergeops.model.readme import read_front_matter
from mergeops.model.writer import TEMP_MARKER, WEIGHTS_SUFFIXES
from mergeops.policy import Policy
from mergeops.protect import checks
from mergeops.protect.architectures import LayerUnit, Plan, resolve
from mergeops.protect.attack import PROXY_ANCHOR_NOISE, AttackMeasurement, attack_sample, proxy_anchor
from mergeops.protect.layer import TensorMap, inverse_maps, load, tensor_maps
from mergeops.protect.transforms import SALT_BYTES, SCHEME, LayerTransform, check_tag, derived_salt, layer_transform
from mergeops.threads import one_torch_thread

VERSION = "2"
META = MERGELOCK_META  # every metadata key MergeLock adds starts with this
# Per-dimension scale 2^±strength. In the quality benchmark (benchmarks/RESULTS.md), merges that include one protected
# MiniLM among 2, 4 and 6 fine-tunes keep at most 3.6% of their above-chance accuracy, by every method, from strength
# 5 on (the noise of a model at chance); at 4, MWA's 6-model merge kept 57%. The default is one binade above that.
LOCKS_FROM = 5
DEFAULT_STRENGTH = 6
MAX_STRENGTH = 30
PREDICATE_TYPE = "https://github.com/mergeops/mergeops/mergelock/v2"
CARDS = ("README.md", "provenance.json")  # the source's, kept inside the protected provenance for unprotect


def protect(model_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], lock_key: bytes, *,
            strength: int = DEFAULT_STRENGTH, random_salt: bool = False, verify: bool = False,
            anchor: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Write a MergeLock-protected copy of ``model_dir`` to ``out_dir`` (which must not exist).

    ``strength``: every transformed dimension is scaled by 2^±strength (0: signed permutations only).
    ``random_salt``: a fresh salt; by default it is derived from the key and the input's digest, so the same key
    and input give the same bytes. ``verify``: also run original and protected through transformers (when
    installed) and compare outputs. ``anchor``: the model the residual-risk attack uses as its anchor (the public
    base model, same layout); without it the attack uses this model plus 5% relative noise per tensor.
    Raises UsageError (nothing written) for an unsupported architecture, an already protected model, a bad key or
    strength, or weights whose dtype cannot hold the transform exactly; MergeopsError (nothing left behind) if the
    protected model does not compute the same function.
    """
    source, out = Path(model_dir), Path(out_dir)
    _check_key(lock_key)
    _check_out(out)
    if isinstance(strength, bool) or not isinstance(strength, int) or not 0 <= strength <= MAX_STRENGTH:
        raise UsageError(f"MergeLock strength must be a whole number from 0 to {MAX_STRENGTH} (got {strength!r}); "
                         f"the default is {DEFAULT_STRENGTH}.")
    with ModelFolder.open(source) as src:
        metadata = _metadata(src)
        if metadata.get(f"{META}scheme"):
            raise UsageError(f"{source} is already MergeLock-protected ({metadata[f'{META}scheme']}); protect the "
                             "original model instead, or `mergeops unprotect` it first. Nothing was written.")
        plan = resolve(src)
        source_hashes = folder_file_hashes(source)
        source_digest = digest_of_listing(source_hashes)
        salt = os.urandom(SALT_BYTES) if random_salt else derived_salt(lock_key, source_digest)
        marks = {f"{META}scheme": SCHEME, f"{META}version": VERSION, f"{META}salt": salt.hex(),
                 f"{META}check": check_tag(lock_key, salt), f"{META}strength": str(strength),
                 f"{META}family": plan.family.name, f"{META}qk": _qk_record(plan),
                 f"{META}tool": f"mergeops {__version__}"}
        headers = {file: _protected_header(file, header, marks) for file, header in _raw_headers(src).items()}
        anchor_folder = _open_anchor(anchor, plan, src) if anchor is not None else None
        measured = checks.Measurements()
        attacked = attack_sample(plan)
        attack = AttackMeasurement(f"given model {anchor}" if anchor is not None else
                                   f"stand-in for the base model: this model plus {PROXY_ANCHOR_NOISE:.0%} relative "
                                   "Gaussian noise")
        headroom: dict[str, int] = {}
        changed: set[str] = set()
        left_out = _left_out(src)
        not_carried = {name: source_hashes[name] for name in left_out if name in source_hashes}
        front = read_front_matter(source)
        kept = {name: _embed(source / name) for name in CARDS if (source / name).is_file()}

        def per_unit(unit: LayerUnit, transform: LayerTransform, maps: list[TensorMap],
                     original: dict[str, torch.Tensor], written: dict[str, torch.Tensor]) -> None:
            for m in maps:
                _check_exact(source, m, original[m.name], written[m.name], strength)
                _lower(headroom, _headroom(original[m.name]))
                changed.add(m.name)
            measured.add(unit, load(unit, original.__getitem__), load(unit, written.__getitem__),
                         transform.head_order)
            if unit.label in attacked:
                anchor_w = ({n: anchor_folder.read(n) for n in original} if anchor_folder else
                            {n: proxy_anchor(t, seed=1000 + unit.layer) for n, t in original.items()})
                attack.add(unit.label, maps, original, written, anchor_w)

        def cards(hashes: dict[str, str]) -> dict[str, bytes]:
            return _protected_cards(source_digest, digest_of_listing(hashes), plan, strength, front, kept,
                                    attack.report(), parts=_parts(plan, strength), not_carried=not_carried)

        try:
            writer = ModelWriter(out, _specs(src), headers=headers, donor=source, carry=_carried, derived_files=cards)
            _rewrite(src, writer, plan, lambda unit: layer_transform(lock_key, salt, unit, strength), inverse=False,
                     per_unit=per_unit, gate=lambda: _invariants_gate(measured))
        finally:
            if anchor_folder is not None:
                anchor_folder.close()
        dtype = _weights_dtype(src, plan)
    output_digest = digest_of_listing(writer.file_hashes)
    report: dict[str, Any] = {
        "scheme": SCHEME, "version": VERSION, "strength": strength, "salt": "random" if random_salt else "derived",
        "source": str(source), "output": str(out), "source_digest": source_digest, "output_digest": output_digest,
        "key_fingerprint": lock_key_fingerprint(lock_key),
        "architecture": plan.architecture, "family": plan.family.label, **_geometry(plan),
        "transformed": _parts(plan, strength), "notes": [*plan.notes, *_strength_notes(strength)],
        "not_carried": left_out,
        "tensors_changed": len(changed),
        "tensors_total": len(src.tensors), "dtype": str(dtype).removeprefix("torch."),
        "headroom": headroom, "movement": measured.movement_report(),
        "function_check": {"invariants": _invariants_report(measured), "forward": None},
        "residual_risk": attack.report(),
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
                        "key_fingerprint": report["key_fingerprint"], "scheme": SCHEME, "strength": strength,
                        "transformed": report["transformed"]}
    return report


def record_protection(policy: Policy, report: dict[str, Any], *, ledger: Ledger | None = None) -> ProtectionRecorded:
    """Record the protected copy ``protect`` reported in the policy's ledger (``ledger``: already open for
    writing; without one it is opened, and its writer lock taken, for this call)."""
    recorded = ProtectionRecorded.from_payload(report["ledger"])
    with writing(policy, ledger, role="protect") as writer:
        recorded = dataclasses.replace(recorded, path=writer.relative(recorded.path))
        writer.record(recorded)
    return recorded


def unprotect(model_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], lock_key: bytes) -> dict[str, Any]:
    """Write the original files of the MergeLock-protected ``model_dir`` to ``out_dir``, byte for byte.

    The files are restored into a temporary folder beside ``out_dir`` and renamed into place only once they hash
    to the source digest the protected copy records. Raises UsageError (nothing written) when the model is not
    protected, was protected with another key or another scheme, or its MergeLock metadata or config.json was
    changed; MergeopsError (nothing written) when the restored files are not the recorded source.
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
            strength = int(metadata[f"{META}strength"])
            tag = metadata[f"{META}check"]
            if not 0 <= strength <= MAX_STRENGTH or len(salt) != SALT_BYTES:
                raise ValueError("strength or salt out of range")
        except (KeyError, ValueError) as exc:
            raise UsageError(f"{source} has damaged MergeLock metadata ({exc}); it cannot be unprotected. "
                             "Nothing was written.") from None
        if not hmac.compare_digest(check_tag(lock_key, salt), tag):
            raise UsageError(f"{source} was protected with a different lock key than the one given (key "
                             f"{lock_key_fingerprint(lock_key)}); use the lock key it was protected with. "
                             "Nothing was written.")
        plan = resolve(src)
        if metadata.get(f"{META}family") != plan.family.name or metadata.get(f"{META}qk") != _qk_record(plan):
            raise UsageError(f"{source}'s MergeLock record (family {metadata.get(f'{META}family')}, "
                             f"q/k {metadata.get(f'{META}qk')}) does not match its config.json and tensors "
                             f"({plan.family.name}, {_qk_record(plan)}); was config.json changed? Nothing was written.")
        record = _source_record(source)
        headers = {file: _original_header(source, file, header) for file, header in src.headers.items()}
        protected_digest = folder_digest(source)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}{TEMP_MARKER}", dir=out.parent))
        try:
            restored = staging / out.name
            writer = ModelWriter(restored, _specs(src), headers=headers, donor=source, carry=_carried)
            writer.extra_files.update(record.cards)
            _rewrite(src, writer, plan, lambda unit: layer_transform(lock_key, salt, unit, strength), inverse=True,
                     per_unit=None, gate=None)
            output_digest = _check_restored(source, restored, record)
            _check_out(out)
            os.rename(restored, out)
            fsync_dir(out.parent)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return {"scheme": SCHEME, "source": str(source), "output": str(out), "source_digest": protected_digest,
            "output_digest": output_digest, "verified": "the restored files hash to the recorded source digest",
            "key_fingerprint": lock_key_fingerprint(lock_key),
            "architecture": plan.architecture, "family": plan.family.label, "strength": strength,
            "cards_restored": sorted(record.cards), "not_restored": sorted(record.not_carried),
            "tensors_total": len(src.tensors)}


def is_protected(model_dir: str | os.PathLike[str]) -> bool:
    """Whether ``model_dir``'s weights carry MergeLock metadata."""
    with ModelFolder.open(model_dir) as src:
        return protection_marks(src) is not None


# -- the streaming rewrite ---------------------------------------------------------------------------
PerUnit = Callable[[LayerUnit, LayerTransform, list[TensorMap], dict[str, torch.Tensor], dict[str, torch.Tensor]],
                   None]


def _rewrite(src: ModelFolder, writer: ModelWriter, plan: Plan, transform_of: Callable[[LayerUnit], LayerTransform],
             *, inverse: bool, per_unit: PerUnit | None, gate: Callable[[], None] | None) -> None:
    """Copy ``src`` through ``writer`` tensor by tensor; a layer's tensors are transformed (or, ``inverse``, restored)
    together when the first of them comes up (one layer in memory). ``gate`` runs before the folder is committed
    and may raise."""
    unit_of = {name: unit for unit in plan.units for name in unit.tensor_names}
    done: set[str] = set()
    with writer, one_torch_thread():
        for name in writer.layout_order:
            if name in done:
                continue
            unit = unit_of.get(name)
            if unit is None:
                writer.write(name, src.read(name))
                done.add(name)
                continue
            original = {n: src.read(n) for n in unit.tensor_names}
            transform = transform_of(unit)
            maps = inverse_maps(tensor_maps(unit, transform)) if inverse else tensor_maps(unit, transform)
            written = dict(original)
            for m in maps:
                written[m.name] = m.monomial.apply(original[m.name], m.axis)
            if per_unit is not None:
                per_unit(unit, transform, maps, original, written)
            for tensor_name, tensor in written.items():
                writer.write(tensor_name, tensor.contiguous())
                done.add(tensor_name)
        if gate is not None:
            gate()


def _check_exact(source: Path, m: TensorMap, original: torch.Tensor, written: torch.Tensor, strength: int) -> None:
    """Refuse a transform the storage dtype cannot hold: undoing it must give the original bits back, and no
    value may overflow or become subnormal (hardware that flushes subnormals would change the function)."""
    dtype = original.dtype
    tiny = torch.finfo(dtype).tiny
    picked = original.index_select(m.axis, m.monomial.perm)
    newly_subnormal = (written != 0) & (written.abs() < tiny) & ~((picked != 0) & (picked.abs() < tiny))
    back = m.monomial.inverse().apply(written, m.axis)
    exact = torch.equal(back.view(_bits(dtype)), original.view(_bits(dtype)))
    if exact and torch.isfinite(written).all() and not bool(newly_subnormal.any()):
        return
    holds = _headroom(original).get(str(dtype).removeprefix("torch."), 0)
    raise UsageError(f"{source}: tensor {m.name!r} ({str(dtype).removeprefix('torch.')}) cannot hold MergeLock's "
                     f"scaling by 2^±{strength}: values would overflow, turn subnormal or lose bits. It holds at most "
                     f"--strength {max(holds, 0)}; protect with that (weaker) or store the model in bfloat16 or "
                     "float32 first. Nothing was written.")


def _bits(dtype: torch.dtype) -> torch.dtype:
    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]


HEADROOM_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _headroom(tensor: torch.Tensor) -> dict[str, int]:
    """Per storage dtype, the largest strength this tensor's values hold exactly (−1: the dtype cannot hold them
    at all): binades above its largest magnitude, and binades between its smallest nonzero magnitude and the
    dtype's smallest normal number (0 when a value is already subnormal)."""
    magnitude = tensor.abs()  # in the stored dtype: max and min of its values are exact there
    largest = float(magnitude.max()) if magnitude.numel() else 0.0
    if largest == 0.0:
        return {str(d).removeprefix("torch."): MAX_STRENGTH for d in HEADROOM_DTYPES}
    smallest = float(magnitude.masked_fill_(magnitude == 0, largest).min())
    found = {}
    for dtype in HEADROOM_DTYPES:
        info = torch.finfo(dtype)
        if largest > info.max:
            found[str(dtype).removeprefix("torch.")] = -1
            continue
        up = math.floor(math.log2(info.max / largest))
        down = math.floor(math.log2(smallest / info.tiny)) if smallest >= info.tiny else 0
        found[str(dtype).removeprefix("torch.")] = max(0, min(up, down, MAX_STRENGTH))
    return found


def _lower(into: dict[str, int], found: dict[str, int]) -> None:
    for dtype, value in found.items():
        into[dtype] = min(into.get(dtype, value), value)


# -- files ---------------------------------------------------------------------------------------------
def _specs(src: ModelFolder) -> list[TensorSpec]:
    return [TensorSpec(name, info.dtype, info.shape) for name, info in src.tensors.items()]


def _raw_headers(src: ModelFolder) -> dict[str, bytes]:
    """Each weights file's header JSON, exactly as stored (without the 8-byte length)."""
    return {file: os.pread(src.fd(file), header.header_bytes - 8, 8) for file, header in src.headers.items()}


def _encode(header: dict[str, Any]) -> bytes:
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _protected_header(file: str, raw: bytes, marks: dict[str, str]) -> bytes:
    """The source header with the marks and the source header itself added to its metadata; every tensor keeps its
    place, so the data region is laid out exactly as in the source."""
    header = untrusted.parse_json(raw, f"the header of {file}")
    metadata = dict(header.pop("__metadata__", None) or {})
    metadata |= marks | {f"{META}header": raw.decode()}
    return _encode({"__metadata__": metadata, **header})


def _original_header(source: Path, file: str, header: Any) -> bytes:
    """The header the source file had before protection, checked against the protected one's tensors."""
    raw = header.metadata.get(f"{META}header")
    try:
        original = untrusted.parse_json(raw, f"the original header kept in {source / file}")
        original.pop("__metadata__", None)
        placed = {e.name: [e.dtype, list(e.shape), e.start - header.header_bytes, e.end - header.header_bytes]
                  for e in header.entries}
        if {n: [v["dtype"], v["shape"], *v["data_offsets"]] for n, v in original.items()} != placed:
            raise ValueError("it places other tensors")
    except (TypeError, ValueError, KeyError, AttributeError, UntrustedFileError) as exc:
        raise UsageError(f"{source / file}: the original header kept in its MergeLock metadata is missing or damaged "
                         f"({exc}); it cannot be unprotected. Nothing was written.") from None
    data = raw.encode()
    return struct.pack("<Q", len(data)) + data


def _carried(relative: str) -> bool:
    """Protect and unprotect carry every file of the model but other weights and optimizer state, which hold the
    original (unprotected) arrangement."""
    name = relative.rsplit("/", 1)[-1]
    return not name.endswith(WEIGHTS_SUFFIXES) and name != "pytorch_model.bin.index.json"


def _left_out(src: ModelFolder) -> list[str]:
    """The files of ``src`` that are neither its weights nor carried."""
    relative = (p.relative_to(src.path).as_posix() for p in src.path.rglob("*") if p.is_file())
    return sorted(r for r in relative if not _carried(r) and r not in src.headers)


def _embed(path: Path) -> dict[str, str]:
    data = untrusted.read_bytes(path)
    try:
        return {"text": data.decode()}
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(data).decode()}


@dataclasses.dataclass(frozen=True)
class _SourceRecord:
    """What the protected provenance records of the source: its digest, its cards, the files left out."""

    digest: str
    cards: dict[str, bytes]
    not_carried: dict[str, str]  # relative path -> sha256 hex


def _source_record(protected: Path) -> _SourceRecord:
    """The source as the protected copy's provenance.json records it; a copy without that record cannot be checked,
    so it is refused."""
    try:
        kept = untrusted.read_json(protected / "provenance.json")["predicate"]["source"]
        digest = kept["digest"]
        not_carried = kept.get("not_carried") or {}
        cards = {name: (entry["text"].encode() if "text" in entry else base64.b64decode(entry["base64"]))
                 for name, entry in kept.get("files", {}).items() if name in CARDS}
        if not (isinstance(digest, str) and isinstance(not_carried, dict)
                and all(isinstance(h, str) for h in not_carried.values())):
            raise TypeError("a digest or file hash is not a string")
    except (MergeopsError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise MergeopsError(f"{protected / 'provenance.json'} does not record the source's digest ({exc}), so what "
                            "unprotect restores cannot be checked; restore that file from the protected copy as it "
                            "was written. Nothing was written.") from None
    return _SourceRecord(digest, cards, not_carried)


def _check_restored(protected: Path, restored: Path, record: _SourceRecord) -> str:
    """The digest of the restored folder, once it (with the files protect left out) is the recorded source."""
    hashes = folder_file_hashes(restored)
    found = digest_of_listing({**record.not_carried, **hashes})
    if found != record.digest:
        raise MergeopsError(f"{protected} does not unprotect to the source it records: the restored files hash to "
                            f"{found}, not {record.digest}, so its weights, MergeLock metadata or provenance.json "
                            "were changed after protection. Nothing was written.")
    return digest_of_listing(hashes)


# -- helpers -----------------------------------------------------------------------------------------
def _check_key(lock_key: bytes) -> None:
    if not isinstance(lock_key, bytes) or len(lock_key) != LOCK_KEY_BYTES:
        raise UsageError(f"a MergeLock key is exactly {LOCK_KEY_BYTES} random bytes (got "
                         f"{len(lock_key) if isinstance(lock_key, bytes) else type(lock_key).__name__}); "
                         "create one with `mergeops keygen --out DIR`.")


def _check_out(out: Path) -> None:
    if out.exists() or out.is_symlink():
        raise UsageError(f"{out} already exists; model folders are never overwritten, so choose a new --out DIR.")


def _metadata(src: ModelFolder) -> dict[str, str]:
    first = next(iter(src.headers.values()))
    return {k: v for k, v in first.metadata.items() if k != "format"}


def _qk_record(plan: Plan) -> str:
    skipped = [u.label for u in plan.units if not u.qk]
    if not skipped:
        return "all"
    return "none" if len(skipped) == len(plan.units) else ";".join(skipped)


def _weights_dtype(src: ModelFolder, plan: Plan) -> torch.dtype:
    """The narrowest dtype any transformed weight is stored in (it sets the precision of the forward check)."""
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


def _invariants_gate(measured: checks.Measurements) -> None:
    report = _invariants_report(measured)
    if not report["passed"]:
        raise MergeopsError(f"MergeLock self-check failed: a layer's attention or MLP changed by "
                            f"{report['max_relative_error']:.2e} (tolerance {report['tolerance']:.0e}); nothing was "
                            "written. Report this as a bug.")


def _invariants_report(measured: checks.Measurements) -> dict[str, Any]:
    worst = max(measured.invariant.values())
    limit = checks.tolerance(torch.float32)
    return {"what": "per head: q·k logits (per rotary pair under RoPE) and Wo·Wv outputs; per MLP: its output; on "
                    "random probes",
            **{f"{branch}_max_relative_error": error for branch, error in measured.invariant.items()},
            "max_relative_error": worst, "tolerance": limit, "passed": worst <= limit}


def _geometry(plan: Plan) -> dict[str, Any]:
    first = plan.units[0]
    towers = sorted({u.tower for u in plan.units if u.tower})
    return {"towers": towers, "layers": len(plan.units), "heads": first.heads, "kv_heads": first.kv_heads,
            "head_dim": first.head_dim, "mlp_size": first.mlp_size,
            "rotary": f"{first.family.rotary} pairs over {first.rotary_dim} dims" if first.rotary_dim else None}


def _strength_notes(strength: int) -> list[str]:
    if strength >= LOCKS_FROM:
        return []
    return [f"strength {strength} is below {LOCKS_FROM}, the smallest measured to break every merge that includes "
            "the protected model (benchmarks/RESULTS.md: at 4 an MWA merge of six models kept 57% of its accuracy, "
            "at 0-2 most merges keep most of it); this copy may not lock."]


def _parts(plan: Plan, strength: int) -> list[str]:
    """Which parts are transformed, in words (for the report, the card and the README)."""
    scale = f" scaled by 2^±{strength}" if strength else ""
    first = plan.units[0]
    parts = []
    if plan.qk:
        within = ("per rotary frequency pair, rotations by multiples of 90°" if first.rotary_dim
                  else "signed permutations of each head's dimensions")
        parts.append(f"attention query/key: whole heads reordered; {within}{scale} (reciprocal on keys)")
    parts.append(f"attention value/output: signed permutations of each head's dimensions{scale} (reciprocal on the "
                 "output projection)")
    parts.append("MLP: hidden neurons permuted" + (f", up rows scaled by 2^±{strength} (reciprocal on down)"
                                                    if first.mlp_gated and strength else ""))
    return parts


def _protected_cards(source_digest: str, digest: str, plan: Plan, strength: int, front: dict[str, Any],
                     kept: dict[str, dict[str, str]], risk: dict[str, Any], parts: list[str],
                     not_carried: dict[str, str]) -> dict[str, bytes]:
    lines = ["---"]
    base = front.get("base_model")
    if base:
        lines += ["base_model:", *(f"- {json.dumps(b)}" for b in ([base] if isinstance(base, str) else base))]
    if isinstance(front.get("license"), str):
        lines.append(f"license: {front['license']}")
    lines += ["tags:", "- mergeops", "- mergelock", "- protected", "---", ""]
    notes = "".join(f"\n- {n}" for n in [*plan.notes, *_strength_notes(strength)])
    transformed = "".join(f"\n- {p}" for p in parts)
    body = f"""# MergeLock-protected model

`{digest}` is a MergeLock-protected copy of `{source_digest}` ({plan.family.label}, {plan.architecture}).

It computes the same function as the original: every transform below is an exact symmetry of the model (a
signed permutation or a power of two, undone inside the same head or MLP), so every output is unchanged up to
the order of floating-point sums. Transformed, in every layer:{transformed}{notes}

What a merge does to it: its weights sit far from every other fine-tune of the same base model, scaled and
rearranged, so averaging, task arithmetic, TIES, OPCM or any other weight-space merge that includes it produces
a broken model. Use it like the original (same config, tokenizer and code); fine-tuning it works as usual.

Residual risk: {risk.get('summary', 'not measured')}.

The lock key is not in this folder; its owner can restore the original files byte for byte with
`mergeops unprotect`. Scheme: {SCHEME}, strength {strength}, recorded in the weights' metadata (`{META}*`).
The source's own card and provenance are kept in `provenance.json`.
"""
    statement = {"_type": IN_TOTO_STATEMENT,
                 "subject": [{"name": "mergelock-protected", "digest": {"sha256": digest.removeprefix("sha256:")}}],
                 "predicateType": PREDICATE_TYPE,
                 "predicate": {"transform": {"scheme": SCHEME, "version": VERSION, "strength": strength,
                                             "parts": parts},
                               # not_carried: the sha256 of each source file the copy leaves out, so that unprotect
                               # can check what it restores against the source digest
                               "source": {"digest": source_digest, "files": kept, "not_carried": not_carried},
                               "tool": {"name": "mergeops", "version": __version__}}}
    return {"README.md": ("\n".join(lines) + body).encode(),
            "provenance.json": (json.dumps(statement, indent=2) + "\n").encode()}


__all__ = ["DEFAULT_STRENGTH", "is_protected", "protect", "protection_marks", "unprotect"]
