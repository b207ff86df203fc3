"""A model folder's tokenizer as intake sees it: its vocabulary (token string → id) and what else decides how text
becomes ids, read from the files themselves (the daemon does not depend on the ``tokenizers`` library).

Tokenizer files are untrusted input like the weights: each is size-capped, must be UTF-8 JSON (or text) of the
expected shape, and a vocabulary that gives one id to two tokens, or two ids to one token, is refused.

* :func:`parse_tokenizer` reads ``tokenizer.json`` (the fast tokenizer: ``model.vocab`` of WordPiece, BPE and
  WordLevel, the ``[piece, score]`` list of Unigram, ``added_tokens``) or else a slow tokenizer's ``vocab.txt`` /
  ``vocab.json`` with ``merges.txt`` and ``added_tokens.json``, plus ``tokenizer_config.json``,
  ``special_tokens_map.json`` and the chat template wherever it is kept.
* :func:`tokenizer_difference` says in one sentence how a checkpoint's tokenizer differs from its base's in
  anything but tokens (which :func:`match_rows` handles): normalizer, pre-tokenizer, model type, merges, special
  tokens, chat template, ...
* :func:`match_rows` finds, per row of the base's embedding, the checkpoint's row of the same token string.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergeops import untrusted
from mergeops.errors import RejectedError, UntrustedFileError

MAX_TOKENIZER_FILE_BYTES = 256 << 20  # the largest real tokenizer.json files are tens of MB
FAST_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
ADDED_TOKENS_FILE = "added_tokens.json"
WORDPIECE_VOCAB = "vocab.txt"
BPE_VOCAB, BPE_MERGES = "vocab.json", "merges.txt"
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
SENTENCEPIECE_FILES = ("tokenizer.model", "spiece.model", "sentencepiece.bpe.model")
TOKENIZER_FILES = (FAST_FILE, CONFIG_FILE, SPECIAL_TOKENS_FILE, ADDED_TOKENS_FILE, WORDPIECE_VOCAB, BPE_VOCAB,
                   BPE_MERGES, *CHAT_TEMPLATE_FILES, *SENTENCEPIECE_FILES)
# Special-token roles of tokenizer_config.json / special_tokens_map.json.
SPECIAL_ROLES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
                 "additional_special_tokens")
# tokenizer.json parts that are call-time settings, not how text becomes ids (newer libraries also write them
# differently: ``truncation`` gained a ``direction``).
_FAST_SETTINGS = frozenset({"version", "truncation", "padding", "added_tokens", "model"})
# tokenizer.json's pipeline: a part left out is no part (null), never "whatever the base has".
_FAST_PIPELINE = ("normalizer", "pre_tokenizer", "post_processor", "decoder")
# Settings of tokenizer_config.json that change how text becomes ids (others are paths, lengths, class names and
# keys that differ between transformers releases).
_CONFIG_SETTINGS = ("do_lower_case", "strip_accents", "tokenize_chinese_chars", "add_prefix_space",
                    "add_bos_token", "add_eos_token", "legacy")
# What an added token is besides its content and id.
_ADDED_TOKEN_FLAGS = ("special", "single_word", "lstrip", "rstrip", "normalized")


@dataclass(frozen=True)
class Aspect:
    """One thing that decides how text becomes ids, and the file it was read from."""

    file: str
    value: Any


@dataclass(frozen=True)
class Tokenizer:
    """A model folder's tokenizer: its vocabulary and every other aspect that decides how text becomes ids."""

    folder: Path
    files: frozenset[str]  # the tokenizer files it has
    vocab: dict[str, int] | None  # token string -> id (model vocabulary and added tokens); None: not readable here
    vocab_file: str | None
    aspects: dict[str, Aspect] = field(default_factory=dict)  # e.g. "normalizer", "merges", "special token eos_token"
    scores: dict[str, float] | None = None  # Unigram: each piece's score (the model: which segmentation wins)


class TokenizerFileError(ValueError):
    """A tokenizer file that cannot be read as what it should be; the message is one sentence naming the file."""


def tokenizer_files(folder: Path) -> dict[str, bytes]:
    """The tokenizer files of a model folder (none: it ships no tokenizer), each size-capped. Raises
    :class:`TokenizerFileError` naming the file at fault."""
    return {name: _read_bytes(folder / name) for name in TOKENIZER_FILES if os.path.lexists(folder / name)}


def parse_tokenizer(folder: Path, files: dict[str, bytes]) -> Tokenizer:
    """The tokenizer of ``files`` (as :func:`tokenizer_files` read them from ``folder``). Raises
    :class:`TokenizerFileError` naming the file at fault."""
    return _Reader(folder, files).tokenizer()


def _read_bytes(path: Path) -> bytes:
    """A tokenizer file through the door (a FIFO or link to nothing there is refused, not passed over)."""
    try:
        return untrusted.read_bytes(path, max_bytes=MAX_TOKENIZER_FILE_BYTES)
    except UntrustedFileError as exc:
        raise TokenizerFileError(f"{exc}") from exc


@dataclass
class _Reader:
    folder: Path
    raw: dict[str, bytes]

    def fail(self, name: str, what: str) -> TokenizerFileError:
        return TokenizerFileError(f"{self.folder / name} {what}; fix it or copy it again from the model's source.")

    def text(self, name: str) -> str:
        try:
            return untrusted.decode_utf8(self.raw[name], self.folder / name)
        except UntrustedFileError as exc:
            raise self.fail(name, exc.reason.split(";")[0]) from None

    def json(self, name: str, kind: type) -> Any:
        try:
            value = untrusted.parse_json(self.raw[name], self.folder / name)
        except UntrustedFileError as exc:
            raise self.fail(name, exc.reason.split(";")[0]) from None
        if not isinstance(value, kind):
            raise self.fail(name, f"is a JSON {type(value).__name__}, not {'an object' if kind is dict else 'a list'}")
        return value

    def optional_json(self, name: str) -> dict[str, Any]:
        return self.json(name, dict) if name in self.raw else {}

    def tokenizer(self) -> Tokenizer:
        aspects: dict[str, Aspect] = {}
        vocab, vocab_file, scores = None, None, None
        if FAST_FILE in self.raw:
            vocab, scores = self.fast(aspects)
            vocab_file = FAST_FILE
        elif WORDPIECE_VOCAB in self.raw or BPE_VOCAB in self.raw:
            vocab_file = WORDPIECE_VOCAB if WORDPIECE_VOCAB in self.raw else BPE_VOCAB
            vocab = self.slow(vocab_file, aspects)
        for name in SENTENCEPIECE_FILES:  # binary protobuf: compared as bytes
            if name in self.raw:
                aspects["sentencepiece model"] = Aspect(name, hashlib.sha256(self.raw[name]).hexdigest())
        self.config_aspects(aspects)
        return Tokenizer(self.folder, frozenset(self.raw), vocab, vocab_file, aspects, scores)

    def fast(self, aspects: dict[str, Aspect]) -> tuple[dict[str, int], dict[str, float] | None]:
        document = self.json(FAST_FILE, dict)
        model = document.get("model")
        if not isinstance(model, dict) or not isinstance(model.get("type"), str):
            raise self.fail(FAST_FILE, "has no \"model\" object with a \"type\"")
        aspects["model type"] = Aspect(FAST_FILE, model["type"])  # first: the most telling difference
        for key in _FAST_PIPELINE:
            aspects[key] = Aspect(FAST_FILE, document.get(key))
        for key, value in document.items():
            if key not in _FAST_SETTINGS:
                aspects[key] = Aspect(FAST_FILE, value)
        settings = {k: v for k, v in model.items() if k not in ("type", "vocab", "merges")}
        aspects["model settings"] = Aspect(FAST_FILE, settings)
        scores = None
        if model["type"] == "Unigram":
            pieces = model.get("vocab")
            if not isinstance(pieces, list) or not all(
                    isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and _is_number(p[1])
                    for p in pieces):
                raise self.fail(FAST_FILE, "has a Unigram model.vocab that is not a list of [piece, score] pairs")
            vocab = self.vocab_of(FAST_FILE, ((piece, i) for i, (piece, _) in enumerate(pieces)))
            scores = {piece: float(score) for piece, score in pieces}
        else:
            entries = model.get("vocab")
            if not isinstance(entries, dict):
                raise self.fail(FAST_FILE, f"has a {model['type']} model.vocab that is not an object of token -> id")
            vocab = self.vocab_of(FAST_FILE, entries.items())
        if "merges" in model:
            aspects["merges"] = Aspect(FAST_FILE, self.merges(FAST_FILE, model["merges"]))
        added = document.get("added_tokens", [])
        if not isinstance(added, list) or not all(
                isinstance(t, dict) and isinstance(t.get("content"), str) and _is_id(t.get("id")) for t in added):
            raise self.fail(FAST_FILE, "has added_tokens that are not a list of objects with a content and an id")
        for token in added:
            aspects[f"added token {token['content']!r}"] = Aspect(
                FAST_FILE, {k: token.get(k) for k in _ADDED_TOKEN_FLAGS})
        return self.with_added(FAST_FILE, vocab, ((t["content"], t["id"]) for t in added)), scores

    def slow(self, vocab_file: str, aspects: dict[str, Aspect]) -> dict[str, int]:
        if vocab_file == WORDPIECE_VOCAB:
            lines = self.text(WORDPIECE_VOCAB).split("\n")
            if lines and lines[-1] == "":
                lines.pop()
            vocab = self.vocab_of(WORDPIECE_VOCAB, ((line.rstrip("\r"), i) for i, line in enumerate(lines)))
            aspects["model type"] = Aspect(WORDPIECE_VOCAB, "WordPiece")
        else:
            vocab = self.vocab_of(BPE_VOCAB, self.json(BPE_VOCAB, dict).items())
            aspects["model type"] = Aspect(BPE_VOCAB, "BPE")
        if BPE_MERGES in self.raw:
            lines = [line for line in self.text(BPE_MERGES).split("\n") if line and not line.startswith("#version")]
            aspects["merges"] = Aspect(BPE_MERGES, self.merges(BPE_MERGES, lines))
        added: list[tuple[str, Any]] = list(self.optional_json(ADDED_TOKENS_FILE).items())
        decoder = self.optional_json(CONFIG_FILE).get("added_tokens_decoder", {})
        if not isinstance(decoder, dict) or not all(isinstance(t, dict) for t in decoder.values()):
            raise self.fail(CONFIG_FILE, "has added_tokens_decoder that is not an object of id -> token")
        for key, token in decoder.items():
            if not key.isdigit() or not isinstance(token.get("content"), str):
                raise self.fail(CONFIG_FILE, f"has an added_tokens_decoder entry {key!r} without an id or content")
            added.append((token["content"], int(key)))
        return self.with_added(ADDED_TOKENS_FILE if ADDED_TOKENS_FILE in self.raw else CONFIG_FILE, vocab, added)

    def merges(self, name: str, merges: Any) -> list[str]:
        """Merges as "a b" strings, whichever way they are written (strings, or [a, b] pairs in newer files)."""
        if not isinstance(merges, list):
            raise self.fail(name, "has merges that are not a list")
        normal = []
        for merge in merges:
            if isinstance(merge, list) and len(merge) == 2 and all(isinstance(part, str) for part in merge):
                normal.append(f"{merge[0]} {merge[1]}")
            elif isinstance(merge, str):
                normal.append(merge)
            else:
                raise self.fail(name, f"has a merge {str(merge)[:40]!r} that is neither \"a b\" nor [a, b]")
        return normal

    def vocab_of(self, name: str, entries: Any) -> dict[str, int]:
        vocab: dict[str, int] = {}
        owner: dict[int, str] = {}
        for token, token_id in entries:
            if not isinstance(token, str) or not _is_id(token_id):
                raise self.fail(name, f"gives token {str(token)[:40]!r} the id {str(token_id)[:20]!r}, not a "
                                "non-negative integer")
            if token in vocab:
                raise self.fail(name, f"lists token {token[:40]!r} twice")
            if token_id in owner:
                raise self.fail(name, f"gives id {token_id} to two tokens, {owner[token_id][:40]!r} and "
                                f"{token[:40]!r}")
            vocab[token], owner[token_id] = token_id, token
        return vocab

    def with_added(self, name: str, vocab: dict[str, int], added: Any) -> dict[str, int]:
        """The vocabulary and the added tokens; an added token already in the vocabulary must keep its id."""
        owner = {token_id: token for token, token_id in vocab.items()}
        merged = dict(vocab)
        for token, token_id in added:
            if not _is_id(token_id):
                raise self.fail(name, f"gives added token {token[:40]!r} the id {str(token_id)[:20]!r}")
            if merged.get(token, token_id) != token_id or owner.get(token_id, token) != token:
                raise self.fail(name, f"gives added token {token[:40]!r} id {token_id}, which disagrees with the "
                                "vocabulary")
            merged[token], owner[token_id] = token_id, token
        return merged

    def config_aspects(self, aspects: dict[str, Aspect]) -> None:
        """Special tokens (role -> content), settings and the chat template of tokenizer_config.json and friends."""
        config = self.optional_json(CONFIG_FILE)
        for name in (SPECIAL_TOKENS_FILE, CONFIG_FILE):  # tokenizer_config.json wins where both say
            source = self.optional_json(name) if name == SPECIAL_TOKENS_FILE else config
            for role in SPECIAL_ROLES:
                if source.get(role) is not None:
                    aspects[f"special token {role}"] = Aspect(name, _token_content(source[role]))
        for key in _CONFIG_SETTINGS:
            if key in config:
                aspects[key] = Aspect(CONFIG_FILE, config[key])
        template = self.chat_template(config)
        if template is not None:
            aspects["chat template"] = template

    def chat_template(self, config: Mapping[str, Any]) -> Aspect | None:
        """The chat template(s): chat_template.jinja (newer transformers), chat_template.json, or the config's."""
        if CHAT_TEMPLATE_FILES[0] in self.raw:
            return Aspect(CHAT_TEMPLATE_FILES[0], self.text(CHAT_TEMPLATE_FILES[0]))
        if CHAT_TEMPLATE_FILES[1] in self.raw:
            return Aspect(CHAT_TEMPLATE_FILES[1], self.json(CHAT_TEMPLATE_FILES[1], dict).get("chat_template"))
        return Aspect(CONFIG_FILE, config["chat_template"]) if config.get("chat_template") is not None else None


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 31


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _token_content(value: Any) -> Any:
    """A special token as its content: a string, an AddedToken object ({"content": ...}) or a list of those."""
    if isinstance(value, list):
        return [_token_content(v) for v in value]
    return value.get("content") if isinstance(value, dict) else value


def _first_difference(a: Any, b: Any, where: str = "") -> str:
    """Where two JSON values first differ, e.g. ``lowercase`` or ``[3]``."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key) or (key in a) != (key in b):
                return _first_difference(a.get(key), b.get(key), f"{where}.{key}" if where else key)
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if x != y:
                return _first_difference(x, y, f"{where}[{i}]")
    return where


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def tokenizer_difference(checkpoint: Tokenizer, base: Tokenizer) -> str | None:
    """One sentence saying how the checkpoint's tokenizer differs from the base's in anything but which tokens it has
    and their ids (normalizer, pre-tokenizer, model type and settings, merges, Unigram scores, added tokens' flags,
    special tokens, chat template), or None. Aspects only one side states are not compared: transformers releases
    write different sets of keys."""
    for name, aspect in checkpoint.aspects.items():
        theirs = base.aspects.get(name)
        if theirs is None or theirs.value == aspect.value:
            continue
        where = _first_difference(aspect.value, theirs.value)
        detail = f" at {where}" if where else ""
        a, b = _short(_at(aspect.value, where)), _short(_at(theirs.value, where))
        return (f"{checkpoint.folder / aspect.file} has a different {name} from the base's{detail} ({a} where the "
                f"base's {theirs.file} has {b}): the checkpoint was trained with another tokenizer, and its weights "
                "cannot be merged with the base's.")
    if base.aspects.get("chat template") is not None and "chat template" not in checkpoint.aspects and (
            CONFIG_FILE in checkpoint.files):
        return (f"{checkpoint.folder / CONFIG_FILE} has no chat template where the base's has one: the checkpoint "
                "was trained with another tokenizer, and its weights cannot be merged with the base's.")
    if checkpoint.scores is not None and base.scores is not None:
        for piece, score in base.scores.items():
            if piece in checkpoint.scores and checkpoint.scores[piece] != score:
                return (f"{checkpoint.folder / FAST_FILE} gives the Unigram piece {piece!r} the score "
                        f"{checkpoint.scores[piece]} where the base's has {score}: the checkpoint was trained with "
                        "another tokenizer, and its weights cannot be merged with the base's.")
    return None


def _at(value: Any, where: str) -> Any:
    """The part of ``value`` at ``where`` (as :func:`_first_difference` writes it), for the message."""
    for part in filter(None, where.replace("[", ".[").split(".")):
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, list) and part.startswith("["):
            value = value[int(part[1:-1])]
    return value


@dataclass(frozen=True)
class RowMatch:
    """Per row of the base's vocabulary-sized tensors, the checkpoint's row of the same token, matched by string."""

    rows: tuple[int, ...]  # the checkpoint's row per base row; -1 where no base token names the row (the base's)
    dropped: tuple[str, ...]  # the checkpoint's tokens the base lacks, by id: their rows are not folded
    moved: tuple[str, ...]  # the base's tokens at another id in the checkpoint

    @property
    def by_index(self) -> bool:
        """Whether the checkpoint's rows are the base's, row for row (nothing to match)."""
        return not self.dropped and all(r == i for i, r in enumerate(self.rows))


def match_rows(base: Tokenizer, checkpoint: Tokenizer, base_rows: int, checkpoint_rows: int) -> RowMatch:
    """The checkpoint's row of each base row, by token string through both tokenizers. Raises RejectedError naming
    the first base token the checkpoint lacks, or a token whose id is beyond the checkpoint's rows."""
    assert base.vocab is not None and checkpoint.vocab is not None
    missing = [t for t, i in base.vocab.items() if i < base_rows and t not in checkpoint.vocab]
    if missing:
        raise RejectedError(f"{checkpoint.folder / checkpoint.vocab_file} lacks {len(missing)} of the base's tokens, "
                            f"first {missing[0]!r}; a fine-tune must keep every token of its base (its rows cannot "
                            "be matched otherwise).")
    beyond = [(t, i) for t, i in checkpoint.vocab.items() if i >= checkpoint_rows]
    if beyond:
        token, token_id = beyond[0]
        raise RejectedError(f"{checkpoint.folder / checkpoint.vocab_file} gives token {token!r} id {token_id}, but "
                            f"the checkpoint's embedding has only {checkpoint_rows} rows; resize the embeddings to "
                            "the tokenizer (model.resize_token_embeddings) before saving.")
    rows = [-1] * base_rows
    for token, token_id in base.vocab.items():
        if token_id < base_rows:
            rows[token_id] = checkpoint.vocab[token]
    moved = tuple(t for t, i in base.vocab.items() if i < base_rows and checkpoint.vocab[t] != i)
    dropped = sorted((i, t) for t, i in checkpoint.vocab.items() if t not in base.vocab)
    if base_rows == checkpoint_rows and not moved and not dropped:
        rows = list(range(base_rows))  # rows no token names are read as stored, as for a checkpoint without tokenizer
    return RowMatch(tuple(rows), tuple(t for _, t in dropped), moved)
