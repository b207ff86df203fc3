"""How a checkpoint's vocabulary-sized rows and tied weights are read against its base.

A fine-tune may ship a tokenizer. It must be the base's in everything but its tokens (:func:`tokenizer_difference`);
its tokens may have been added to (the embeddings resized) or given other ids. With the stream's ``vocab = "base"``
the rows of the base's tokens are folded, found by token string through both tokenizers, and the added rows are
dropped; with ``"reject"`` (the default) such a checkpoint is rejected, naming what changed. A checkpoint without
tokenizer files is read by row index, as long as its rows are the base's in number.

A checkpoint may also store an output matrix once, tied to its input embeddings (``tie_word_embeddings``): a base
tensor it leaves out that its family ties is read as the checkpoint's own input tensor (:func:`tied_in_checkpoint`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

from mergeops.errors import PolicyError, RejectedError
from mergeops.intake.tokenizer import (
    TOKENIZER_FILES,
    RowMatch,
    Tokenizer,
    TokenizerFileError,
    match_rows,
    parse_tokenizer,
    tokenizer_difference,
    tokenizer_files,
)
from mergeops.isolated import Failed, TookTooLong, run_isolated
from mergeops.model import ModelFolder
from mergeops.model.architectures import is_vocab, tied_weights

_SHOWN = 3  # tokens named in a message
# Reading both tokenizers, in a child process: a real one takes under a second; a 200 MB tokenizer.json of short
# tokens took 50 s and 3 GB, and in the daemon's own process no SIGTERM or watchdog ping would get through meanwhile.
TOKENIZER_SECONDS = 30.0
# Tokenizer files up to this size (every real tokenizer but the largest vocabularies) are parsed in this process, in
# well under 2 s: a child costs more than it bounds (in a fresh `mergeops fold`, starting its forkserver took 2.3 s).
IN_PROCESS_TOKENIZER_BYTES = 16 << 20


def tied_in_checkpoint(checkpoint: ModelFolder, base: ModelFolder) -> dict[str, str]:
    """The base's tensors the checkpoint leaves out because its config ties them (output -> the checkpoint's input
    tensor that holds it): their values are the checkpoint's input tensor's."""
    return {output: source for output, source in tied_weights(checkpoint.config).items()
            if output in base.tensors and output not in checkpoint.tensors and source in checkpoint.tensors}


def vocab_rows(checkpoint: ModelFolder, base: ModelFolder, tied: dict[str, str], setting: str,
               tick: Callable[[], None] = lambda: None) -> RowMatch | None:
    """How the rows of the base's vocabulary-sized tensors are read from the checkpoint: None by row index, or
    matched by token string (``setting`` "base"). Raises RejectedError naming the tokenizer file, token or tensor
    at fault. ``tick()`` is called while the tokenizers are read (it may raise to stop)."""
    names = [n for n in base.tensors if is_vocab(n) and tied.get(n, n) in checkpoint.tensors]
    base_rows = _rows(base, names, base.path.name)
    rows = _rows(checkpoint, [tied.get(n, n) for n in names], str(checkpoint.path))
    ours, theirs, same = _tokenizers(checkpoint.path, base, tick)
    if ours is None:
        if rows != base_rows:
            raise RejectedError(f"{checkpoint.path} has {rows} vocabulary rows where the base has {base_rows}, "
                                "and no tokenizer files to match them by; save the tokenizer with the model "
                                "(tokenizer.save_pretrained).")
        return None
    if same and rows == base_rows:
        return None  # the base's tokenizer, byte for byte, and its rows
    if theirs is None:
        if rows != base_rows:
            raise RejectedError(f"{checkpoint.path} has {rows} vocabulary rows where the base has {base_rows}, and "
                                "the base has no tokenizer to match them by; only fine-tunes of the base can be "
                                "merged.")
        return None
    difference = tokenizer_difference(ours, theirs)
    if difference:
        raise RejectedError(difference)
    if not names:
        return None  # no tensor has a row per token: nothing to match
    if ours.vocab is None or theirs.vocab is None:
        if rows != base_rows or ours.aspects != theirs.aspects:
            raise RejectedError(f"{checkpoint.path}'s tokenizer differs from the base's, and its vocabulary cannot be "
                                "read here (only a sentencepiece model); save it with tokenizer.json as well.")
        return None
    match = match_rows(theirs, ours, base_rows, rows)
    if match.by_index and rows == base_rows:
        return None  # (more rows than the base's, even unnamed padding, are matched: a tensor is read in its shape)
    if setting == "reject":
        raise RejectedError(_changed(checkpoint, match, rows, base_rows))
    return match


def adapter_tokenizer_problem(path: Path, base: ModelFolder, tick: Callable[[], None] = lambda: None) -> str | None:
    """Why the tokenizer a LoRA adapter ships cannot go with it, if it cannot: an adapter updates the base's rows by
    id, so its tokenizer must be the base's, tokens and ids included."""
    ours, theirs, same = _tokenizers(path, base, tick)
    if ours is None or theirs is None or same:
        return None
    difference = tokenizer_difference(ours, theirs)
    if difference:
        return difference
    if ours.vocab != theirs.vocab:
        return (f"{path} is a LoRA adapter whose tokenizer has other tokens or ids than the base's; an adapter updates "
                "the base's embedding rows by id and cannot add or move tokens: ship the base's tokenizer with it, or "
                'merge it into a full checkpoint and fold that with vocab = "base".')
    return None


def _tokenizers(path: Path, base: ModelFolder, tick: Callable[[], None]
                ) -> tuple[Tokenizer | None, Tokenizer | None, bool]:
    """The checkpoint's tokenizer (None: it ships none), the base's (None: it has none, or the checkpoint ships none)
    and whether their files are the same bytes (then the base's is the checkpoint's, not parsed twice); read in a
    child process within ``TOKENIZER_SECONDS``."""
    try:
        small = _tokenizer_bytes(path) <= IN_PROCESS_TOKENIZER_BYTES
        read = _read_tokenizers(path, base.path) if small else \
            run_isolated(_read_tokenizers, (path, base.path), tick, TOKENIZER_SECONDS)
    except TookTooLong as exc:
        raise RejectedError(f"{path}'s tokenizer files took longer than {TOKENIZER_SECONDS:g} s to read; a real "
                            "tokenizer's take under a second.") from exc
    except Failed as exc:
        raise RejectedError(f"{path}'s tokenizer files could not be read ({exc}).") from exc
    if len(read) == 2:
        whose, message = read
        if whose == "base":
            raise PolicyError(f"the stream's base has an unreadable tokenizer: {message}")
        raise RejectedError(message)
    return read


def _tokenizer_bytes(folder: Path) -> float:
    """The size of the tokenizer files in ``folder`` as they say (infinite if one cannot be asked: the child reads
    and names it)."""
    try:
        return sum(os.stat(folder / name).st_size for name in TOKENIZER_FILES if os.path.lexists(folder / name))
    except OSError:
        return math.inf


def _read_tokenizers(path: Path, base_path: Path
                     ) -> tuple[Tokenizer | None, Tokenizer | None, bool] | tuple[str, str]:
    """What :func:`_tokenizers` returns, or ``(whose, message)`` if the checkpoint's or the base's tokenizer files
    cannot be read (run in a child process: only the result travels back)."""
    try:
        files = tokenizer_files(path)
        ours = parse_tokenizer(path, files) if files else None
    except TokenizerFileError as exc:
        return "checkpoint", str(exc)
    if ours is None:
        return None, None, False
    try:
        base_files = tokenizer_files(base_path)
        if base_files == files:
            return ours, ours, True
        return ours, parse_tokenizer(base_path, base_files) if base_files else None, False
    except TokenizerFileError as exc:
        return "base", str(exc)


def _rows(folder: ModelFolder, names: list[str], where: str) -> int:
    """The row count the vocabulary-sized tensors ``names`` share."""
    counts = {name: folder.tensors[name].shape[0] for name in names if folder.tensors[name].shape}
    if len(set(counts.values())) > 1:
        (first, a), *others = counts.items()
        other, b = next((n, c) for n, c in others if c != a)
        raise RejectedError(f"{where} has {a} rows in {first!r} but {b} in {other!r}; tensors with a row per token "
                            "must agree on the vocabulary's size.")
    return next(iter(counts.values()), 0)


def _changed(checkpoint: ModelFolder, match: RowMatch, rows: int, base_rows: int) -> str:
    """Why a checkpoint whose vocabulary is not the base's is rejected under ``vocab = "reject"``."""
    hint = ('set vocab = "base" in the stream\'s policy to fold the rows of the base\'s tokens and drop the others, '
            "or fine-tune without changing the tokenizer.")
    if match.dropped:
        first = ", ".join(repr(t) for t in match.dropped[:_SHOWN])
        return f"{checkpoint.path} adds {len(match.dropped)} token(s) the base lacks ({first}); {hint}"
    if match.moved:
        first = ", ".join(repr(t) for t in match.moved[:_SHOWN])
        return f"{checkpoint.path} gives {len(match.moved)} of the base's tokens other ids ({first}); {hint}"
    return (f"{checkpoint.path} has {rows} vocabulary rows where the base has {base_rows} (rows no token names, such "
            f"as padding to a multiple); {hint}")
