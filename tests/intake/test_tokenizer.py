"""A model folder's tokenizer as intake reads it: the vocabulary (checked against transformers' own reading), how a
checkpoint's tokenizer may differ from its base's (only in tokens), the rows of the base's tokens found by string,
and tokenizer files as untrusted input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mergeops.errors import RejectedError
from mergeops.intake import tokenizer as tokenizer_module
from mergeops.intake.tokenizer import (
    TokenizerFileError,
    match_rows,
    parse_tokenizer,
    tokenizer_difference,
    tokenizer_files,
)
from tests.protect.conftest import minilm_dir

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


def read(folder: Path):  # type: ignore[no-untyped-def]
    return parse_tokenizer(folder, tokenizer_files(folder))


def minilm_saved(tmp_path: Path, name: str, change=None) -> Path:  # type: ignore[no-untyped-def]
    """The packaged MiniLM tokenizer as today's transformers saves it, after ``change`` (on the tokenizer)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir())
    if change is not None:
        change(tokenizer)
    tokenizer.save_pretrained(tmp_path / name)
    return tmp_path / name


def word_level(tmp_path: Path, name: str, words: list[str], **config) -> Path:  # type: ignore[no-untyped-def]
    """A word-level tokenizer with ``words`` in id order, saved by transformers."""
    model = tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]")
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", **config)
    fast.save_pretrained(tmp_path / name)
    return tmp_path / name


WORDS = ["[UNK]", "[PAD]", "the", "cat", "sat", "on", "mat", "a", "dog"]


def test_the_vocabulary_is_what_transformers_reads_from_the_same_files(tmp_path):
    packaged = read(minilm_dir())
    assert packaged.vocab == transformers.AutoTokenizer.from_pretrained(minilm_dir()).get_vocab()
    assert packaged.vocab_file == "tokenizer.json" and len(packaged.vocab) == 30522
    (tmp_path / "slow").mkdir()  # a slow tokenizer's vocab.txt gives the same vocabulary
    shutil.copy(minilm_dir() / "vocab.txt", tmp_path / "slow" / "vocab.txt")
    assert read(tmp_path / "slow").vocab == packaged.vocab


def test_the_base_tokenizer_saved_again_by_todays_transformers_is_the_same_tokenizer(tmp_path):
    """The packaged MiniLM files were written by an old release; a fine-tune's are written by the installed one (other
    keys, another truncation object, no vocab.txt): that is no difference, and the rows are read by index."""
    base, again = read(minilm_dir()), read(minilm_saved(tmp_path, "again"))
    assert tokenizer_difference(again, base) is None
    assert match_rows(base, again, 30522, 30522).by_index


def test_added_tokens_are_the_only_tokens_dropped_and_every_base_token_keeps_its_row(tmp_path):
    saved = minilm_saved(tmp_path, "added", lambda t: t.add_tokens(["<gene>", "<protein>"]))
    base, added = read(minilm_dir()), read(saved)
    assert tokenizer_difference(added, base) is None  # tokens added: not a different tokenizer
    match = match_rows(base, added, 30522, 30524)
    assert match.dropped == ("<gene>", "<protein>") and not match.by_index
    reference = transformers.AutoTokenizer.from_pretrained(saved)
    base_tokens = transformers.AutoTokenizer.from_pretrained(minilm_dir()).convert_ids_to_tokens(range(30522))
    assert list(match.rows) == reference.convert_tokens_to_ids(base_tokens)


def test_moved_ids_are_matched_by_token_string(tmp_path):
    moved_words = [WORDS[0], WORDS[1], *reversed(WORDS[2:])]
    base, moved = word_level(tmp_path, "base", WORDS), word_level(tmp_path, "moved", moved_words)
    match = match_rows(read(base), read(moved), len(WORDS), len(WORDS))
    ours, theirs = (transformers.AutoTokenizer.from_pretrained(p) for p in (base, moved))
    assert list(match.rows) == theirs.convert_tokens_to_ids(ours.convert_ids_to_tokens(range(len(WORDS))))
    assert match.dropped == () and set(match.moved) == set(WORDS[2:]) - {"on"}  # "on" is in the middle: it stays


def test_rows_no_base_token_names_are_read_as_the_bases(tmp_path):
    """A base padded beyond its tokenizer (12 rows, 9 tokens) whose fine-tune put an added token in row 9."""
    base, added = word_level(tmp_path, "base", WORDS), word_level(tmp_path, "added", [*WORDS, "<new>"])
    match = match_rows(read(base), read(added), 12, 12)
    assert match.rows == (*range(9), -1, -1, -1) and match.dropped == ("<new>",)


def test_a_base_token_the_checkpoint_lacks_is_a_rejection_naming_it(tmp_path):
    base, fewer = word_level(tmp_path, "base", WORDS), word_level(tmp_path, "fewer", WORDS[:-1])
    with pytest.raises(RejectedError, match=r"lacks 1 of the base's tokens, first 'dog'"):
        match_rows(read(base), read(fewer), 9, 8)


def test_a_token_beyond_the_checkpoints_rows_is_a_rejection(tmp_path):
    base, added = word_level(tmp_path, "base", WORDS), word_level(tmp_path, "added", [*WORDS, "<new>"])
    with pytest.raises(RejectedError, match=r"gives token '<new>' id 9, but the checkpoint's embedding has only 9"):
        match_rows(read(base), read(added), 9, 9)


def _lowercase_off(t) -> None:  # type: ignore[no-untyped-def]
    t.backend_tokenizer.normalizer = tokenizers.normalizers.BertNormalizer(lowercase=False)


def _whitespace_pre_tokenizer(t) -> None:  # type: ignore[no-untyped-def]
    t.backend_tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()


def _other_mask_token(t) -> None:  # type: ignore[no-untyped-def]
    t.mask_token = "[unused1]"


def _chat_template(t) -> None:  # type: ignore[no-untyped-def]
    t.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"


@pytest.mark.parametrize(("change", "file", "what"), [
    (_lowercase_off, "tokenizer.json", "different normalizer from the base's at lowercase (false where"),
    (_whitespace_pre_tokenizer, "tokenizer.json", "different pre_tokenizer from the base's at type"),
    (_other_mask_token, "tokenizer_config.json", "different special token mask_token"),
    (_chat_template, "chat_template.jinja", "different chat template"),
])
def test_a_tokenizer_that_differs_in_more_than_tokens_is_named_with_the_file_and_what(tmp_path, change, file, what):
    base = read(minilm_dir())
    if change is _chat_template:  # a base with one template, a checkpoint with another
        base = read(minilm_saved(tmp_path, "base", lambda t: setattr(t, "chat_template", "{{ messages }}")))
    message = tokenizer_difference(read(minilm_saved(tmp_path, "changed", change)), base)
    assert message is not None and what in message and str(tmp_path / "changed" / file) in message
    assert message.count(". ") == 0 and message.endswith(".")  # one sentence


@pytest.mark.parametrize("part", ["normalizer", "pre_tokenizer"])
def test_a_pipeline_part_left_out_of_tokenizer_json_is_no_part_and_so_a_difference(tmp_path, part):
    """Deleting the base's normalizer (or pre-tokenizer) from tokenizer.json changes how text becomes ids."""
    document = json.loads((minilm_dir() / "tokenizer.json").read_text())
    del document[part]
    folder = _write(tmp_path / "changed", "tokenizer.json", json.dumps(document))
    message = tokenizer_difference(read(folder), read(minilm_dir()))
    assert message is not None and f"different {part} from the base's" in message and "(null where" in message


def test_another_model_type_or_other_merges_are_differences(tmp_path):
    words = word_level(tmp_path, "words", WORDS)
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE({"a": 0, "b": 1, "ab": 2, "[UNK]": 3}, [("a", "b")],
                                                     unk_token="[UNK]"))
    transformers.PreTrainedTokenizerFast(tokenizer_object=bpe).save_pretrained(tmp_path / "bpe")
    message = tokenizer_difference(read(tmp_path / "bpe"), read(words))
    assert "different model type" in message and '"BPE"' in message and '"WordLevel"' in message
    other = tokenizers.Tokenizer(tokenizers.models.BPE({"a": 0, "b": 1, "ba": 2, "[UNK]": 3}, [("b", "a")],
                                                       unk_token="[UNK]"))
    transformers.PreTrainedTokenizerFast(tokenizer_object=other).save_pretrained(tmp_path / "other")
    assert "different merges" in tokenizer_difference(read(tmp_path / "other"), read(tmp_path / "bpe"))


def _write(folder: Path, name: str, data: bytes | str) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    return folder


def _fast(vocab, added=()) -> str:  # type: ignore[no-untyped-def]
    return json.dumps({"model": {"type": "WordPiece", "vocab": vocab}, "added_tokens": list(added)})


@pytest.mark.parametrize(("name", "data", "needle"), [
    ("tokenizer.json", b'{"model": "\xff"}', "is not UTF-8 text"),
    ("tokenizer.json", "{oops", "is not valid JSON"),
    ("tokenizer.json", "[1, 2]", "is a JSON list, not an object"),
    ("tokenizer.json", '{"model": {"type": "WordPiece", "vocab": 1, "vocab": 2}}', "gives the key 'vocab' twice"),
    ("tokenizer.json", '{"model": {"type": "WordPiece", "vocab": ' + "[" * 100_000 + "]" * 100_000 + "}}",
     "nests deeper than"),
    ("tokenizer.json", '{"model": {"type": "WordPiece", "vocab": {"a": ' + "9" * 5000 + "}}}",
     "an integer of 5000 digits"),
    ("tokenizer.json", '{"model": {"vocab": {}}}', 'no "model" object with a "type"'),
    ("tokenizer.json", _fast(["a", "b"]), "model.vocab that is not an object of token -> id"),
    ("tokenizer.json", _fast({"a": 0, "b": 0}), "gives id 0 to two tokens, 'a' and 'b'"),
    ("tokenizer.json", _fast({"a": -1}), "gives token 'a' the id '-1', not a non-negative integer"),
    ("tokenizer.json", _fast({"a": True}), "gives token 'a' the id 'True'"),
    ("tokenizer.json", _fast({"a": 0}, [{"id": 1, "content": "a"}]), "added token 'a' id 1, which disagrees"),
    ("tokenizer.json", _fast({"a": 0}, [{"content": "b"}]), "added_tokens that are not a list of objects"),
    ("tokenizer.json", json.dumps({"model": {"type": "Unigram", "vocab": [["a", "x"]]}}), "[piece, score] pairs"),
    ("vocab.txt", "a\nb\na\n", "lists token 'a' twice"),
    ("vocab.json", '{"a": 0, "b": "1"}', "gives token 'b' the id '1'"),
])
def test_tokenizer_files_are_untrusted_input_refused_with_the_file_named(tmp_path, name, data, needle):
    folder = _write(tmp_path / "m", name, data)
    with pytest.raises(TokenizerFileError) as caught:
        read(folder)
    assert needle in str(caught.value) and str(folder / name) in str(caught.value)
    assert str(caught.value).count("fix it or copy it again") == 1  # one sentence, not one wrapped in another


def test_a_tokenizer_file_beyond_the_size_cap_is_refused_before_it_is_parsed(tmp_path, monkeypatch):
    monkeypatch.setattr(tokenizer_module, "MAX_TOKENIZER_FILE_BYTES", 1000)
    folder = _write(tmp_path / "m", "tokenizer.json", _fast({f"t{i}": i for i in range(200)}))
    with pytest.raises(TokenizerFileError, match="bytes, larger than the 1000 bytes"):
        tokenizer_files(folder)


def test_a_folder_without_tokenizer_files_has_none(tmp_path):
    (tmp_path / "m").mkdir()
    assert tokenizer_files(tmp_path / "m") == {}
