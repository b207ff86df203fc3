"""Hostile inputs, as hypothesis strategies: what an attacker (or a broken producer) can put into a registry folder.

Each strategy draws a *mutation*: a callable that damages one file of a good checkpoint folder in place, with a
readable ``repr`` so that a failing example says what it did.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hypothesis import strategies as st

# Values that have broken parsers: huge and negative counts, non-finite numbers, wrong types, odd strings.
ODD_NUMBERS = st.sampled_from([0, -1, 1, 2**31, 2**63, -(2**63), 10**40, 10**300, 1e300, -1e-300, 0.5, 1e-45])
ODD_STRINGS = st.sampled_from(["", "\x00", "..", "../../etc/passwd", "a" * 10_000, "ä\u202e", "(a+)+$", "a*" * 40,
                               "(?P<x>a)(?P=x)", "[", "\\", "\ud800".encode("utf-8", "surrogatepass").decode(
                                   "utf-8", "replace"), "NaN", "Infinity", "1e999"])
JSON_SCALARS = st.one_of(st.none(), st.booleans(), ODD_NUMBERS, st.integers(), st.floats(allow_nan=False,
                         allow_infinity=False), ODD_STRINGS, st.text(max_size=30))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(ODD_STRINGS, st.text(max_size=10)), inner, max_size=4)),
    max_leaves=12)


def deep(depth: int, opener: str = "[", closer: str = "]") -> str:
    return opener * depth + closer * depth


# Texts that are not the JSON a reader expects: nesting past any stack, numbers past any float, constants JSON does
# not have, a key given twice, bytes that are not UTF-8, nothing at all.
HOSTILE_JSON_TEXT = st.one_of(
    st.integers(1_000, 200_000).map(deep),
    st.integers(1_000, 200_000).map(lambda n: '{"a":' * n + "1" + "}" * n),
    st.sampled_from(['{"r": 1' + "0" * 5000 + "}", '{"x": NaN}', '{"x": -Infinity}', '{"x": 1e999}',
                     '{"a": 1, "a": 2}', "", "null", "[]", '"text"', "{", '{"a": "\\ud800"}', "\ufeff{}",
                     '{"vocab": {"a": 0, "a": 1}}']),
    JSON_VALUES.map(json.dumps),
    st.dictionaries(st.text(max_size=12), JSON_VALUES, max_size=6).map(json.dumps),
)
HOSTILE_BYTES = st.one_of(st.binary(max_size=2_000), st.sampled_from([b"\xff\xfe\x00", b"\x80" * 100, b"\x00" * 64]))


@dataclass(frozen=True)
class Mutation:
    """Damage done to one file of a checkpoint folder."""

    file: str
    what: str
    apply: Callable[[Path], None]

    def __call__(self, folder: Path) -> None:
        self.apply(folder / self.file)

    def __repr__(self) -> str:
        return f"Mutation({self.file!r}, {self.what[:120]!r})"


def _replace(path: Path, data: bytes) -> None:
    path.unlink(missing_ok=True)
    path.write_bytes(data)


def _fifo(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def _symlink(target: str) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        path.unlink(missing_ok=True)
        path.symlink_to(target)
    return apply


def _directory(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.mkdir()


def _truncate(fraction: float) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        os.truncate(path, int(path.stat().st_size * fraction))
    return apply


# Whatever the file is meant to hold: something else that is not a regular file, or not its bytes.
NOT_A_FILE = st.sampled_from([
    ("a FIFO", _fifo), ("a symlink to /dev/zero", _symlink("/dev/zero")), ("a symlink to itself", None),
    ("a folder", _directory), ("a symlink out of the folder", _symlink("/etc/hostname")),
    ("a dangling symlink", _symlink("nowhere/at/all")),
])


def file_mutations(file: str, *, json_file: bool) -> st.SearchStrategy[Mutation]:
    """Mutations of ``file``: not a regular file, truncated, arbitrary bytes, and for JSON files hostile JSON."""
    def not_a_file(drawn: tuple[str, Callable[[Path], None] | None]) -> Mutation:
        what, apply = drawn
        return Mutation(file, what, apply or _symlink(file))

    kinds = [NOT_A_FILE.map(not_a_file),
             st.floats(0.0, 0.99).map(lambda f: Mutation(file, f"truncated to {f:.2f}", _truncate(f))),
             HOSTILE_BYTES.map(lambda b: Mutation(file, f"bytes {b[:40]!r}", lambda p: _replace(p, b)))]
    if json_file:
        kinds.append(HOSTILE_JSON_TEXT.map(lambda t: Mutation(file, f"JSON {t[:80]!r}",
                                                              lambda p: _replace(p, t.encode("utf-8", "replace")))))
    return st.one_of(kinds)


# -- safetensors headers ---------------------------------------------------------------------------------------------
def _rewrite_header(edit: Callable[[dict], object], length: int | None = None) -> Callable[[Path], None]:
    """Rewrite a safetensors file's JSON header by ``edit`` (which changes the parsed header in place, or returns a
    replacement document); ``length`` forces the 8-byte length field."""
    def apply(path: Path) -> None:
        data = path.read_bytes()
        (size,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + size])
        replaced = edit(header)
        text = json.dumps(header if replaced is None else replaced).encode()
        path.unlink()
        path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data[8 + size:])
    return apply


def _first_tensor(header: dict) -> dict:
    return header[next(k for k in header if k != "__metadata__")]


HEADER_EDITS = st.one_of(
    st.sampled_from(["F31", "", "I4", "f32", "BF16", "U64", "BOOL", "F8_E4M3"]).map(
        lambda d: (f"dtype {d!r}", lambda h: _first_tensor(h).update(dtype=d))),
    st.lists(ODD_NUMBERS, max_size=4).map(lambda s: (f"shape {s}", lambda h: _first_tensor(h).update(shape=s))),
    st.lists(ODD_NUMBERS, min_size=0, max_size=3).map(
        lambda o: (f"data_offsets {o}", lambda h: _first_tensor(h).update(data_offsets=o))),
    JSON_VALUES.map(lambda v: (f"__metadata__ {v!r}"[:100], lambda h: h.update(__metadata__=v))),
    JSON_VALUES.map(lambda v: (f"a tensor entry {v!r}"[:100], lambda h: h.update({"x.weight": v}))),
    JSON_VALUES.map(lambda v: (f"the whole header {v!r}"[:100], lambda h: v)),
    st.just(("two tensors on the same bytes", lambda h: h.update({"dup.weight": dict(_first_tensor(h))}))),
)


def header_mutations(file: str) -> st.SearchStrategy[Mutation]:
    edits = HEADER_EDITS.map(lambda e: Mutation(file, f"header: {e[0]}", _rewrite_header(e[1])))
    lengths = st.sampled_from([0, 1, 7, 2**31, 2**63 - 1, 2**64 - 1]).map(
        lambda n: Mutation(file, f"header length {n}", _rewrite_header(lambda h: None, n)))
    return st.one_of(edits, lengths)


# -- adapter configs, trainer files ----------------------------------------------------------------------------------
ADAPTER_KEYS = ["peft_type", "r", "lora_alpha", "target_modules", "exclude_modules", "rank_pattern", "alpha_pattern",
                "use_rslora", "fan_in_fan_out", "bias", "base_model_name_or_path", "use_dora", "modules_to_save",
                "layers_to_transform", "init_lora_weights", "task_type", "megatron_config", "unknown_setting"]
# Module patterns, among them ones that backtrack catastrophically in a backtracking engine, with and without a
# repeated group, and ones only Python's engine understands.
PATTERNS = st.one_of(ODD_STRINGS, st.sampled_from([
    r".*\.(q_proj|v_proj)", r"(a+)+b", r"(a|aa)+$", "a*" * 30 + "b", ".*.*.*.*.*.*.*.*.*=", r"(?=.*q).*proj",
    r"(x)\1", r"(?<!o)_proj", r"(.*a){20}", r"\w+\s?\w+\s?\w+\s?\w+\s?!", r"[", r"(?P<n>q)(?P=n)", "all-linear",
    r"(?:(?:(?:(?:a*)*)*)*)*b",
]))


def adapter_configs() -> st.SearchStrategy[str]:
    """adapter_config.json texts: a plain LoRA config with some settings replaced by odd values or patterns."""
    good = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "bias": "none"}
    value = st.one_of(JSON_VALUES, PATTERNS, st.lists(PATTERNS, max_size=3),
                      st.dictionaries(PATTERNS, ODD_NUMBERS, max_size=3))
    edited = st.dictionaries(st.sampled_from(ADAPTER_KEYS), value, max_size=4).map(lambda e: json.dumps(good | e))
    return st.one_of(edited, HOSTILE_JSON_TEXT)


def trainer_states() -> st.SearchStrategy[str]:
    entry = st.dictionaries(st.sampled_from(["loss", "step", "epoch", "eval_loss"]), JSON_VALUES, max_size=3)
    document = st.fixed_dictionaries({"global_step": JSON_VALUES, "log_history": st.one_of(
        st.lists(entry, max_size=4), JSON_VALUES)})
    return st.one_of(document.map(json.dumps), HOSTILE_JSON_TEXT)
