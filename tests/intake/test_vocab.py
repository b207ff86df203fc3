"""Intake's decision on how a checkpoint's vocabulary rows and tied weights are read, on models saved by the installed
transformers: ties per family, resized and reordered vocabularies under each ``vocab`` setting, tokenizer
mismatches, and what stays a rejection."""

from __future__ import annotations

import json
import time

import pytest
import torch

from mergeops.errors import RejectedError
from mergeops.intake import vocab
from mergeops.intake.checkpoint import receive
from mergeops.ledger.kinds import CheckpointFacts
from mergeops.model import ModelFolder
from tests.intake.finetunes import WORDS, finetune, save_model


def checked(base, checkpoint, vocab="reject"):  # type: ignore[no-untyped-def]
    """The checkpoint as intake leaves it after checking it against the base."""
    with receive(checkpoint, CheckpointFacts(str(checkpoint))) as taken, ModelFolder.open(base) as opened:
        taken.check_against_base(opened, vocab)
        return taken


TIES = {"llama": {"lm_head.weight": "model.embed_tokens.weight"}, "gpt2": {"lm_head.weight": "transformer.wte.weight"},
        "bert": {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
                 "cls.predictions.decoder.bias": "cls.predictions.bias"}}


@pytest.mark.parametrize("family", list(TIES))
def test_a_checkpoint_tied_where_its_base_stores_both_holds_its_own_embeddings_there(tmp_path, family):
    """The base stores its head; the fine-tune ties it (Llama: tie_word_embeddings=True; GPT-2 and BERT: their
    default) and transformers saves it once."""
    base = save_model(tmp_path / "base", family, WORDS, tie_word_embeddings=False)
    checkpoint = finetune(base, tmp_path / "ck", seed=1, tie=True)
    tied = TIES[family]
    with ModelFolder.open(checkpoint) as saved, ModelFolder.open(base) as stored:
        assert set(tied) <= set(stored.tensors) and not set(tied) & set(saved.tensors)  # as transformers saves them
    taken = checked(base, checkpoint)
    assert taken.view.tied == tied and taken.facts().tied == tied and taken.rows is None


def _without_tie_key(checkpoint):  # type: ignore[no-untyped-def]
    config = json.loads((checkpoint / "config.json").read_text())
    del config["tie_word_embeddings"]
    (checkpoint / "config.json").write_text(json.dumps(config))


def test_a_tie_follows_the_checkpoints_config_and_else_its_familys_default(tmp_path):
    """GPT-2 ties by default, Llama does not: a Llama checkpoint whose config does not say it ties and leaves out its
    head lacks a tensor."""
    for family, default in (("gpt2", True), ("llama", False)):
        base = save_model(tmp_path / f"{family}-base", family, WORDS, tie_word_embeddings=False)
        checkpoint = finetune(base, tmp_path / f"{family}-ck", seed=1, tie=True)
        _without_tie_key(checkpoint)
        if default:
            assert checked(base, checkpoint).view.tied == {"lm_head.weight": "transformer.wte.weight"}
            continue
        with pytest.raises(RejectedError, match=r"lacks 1 tensor\(s\) of the base, first 'lm_head.weight'"):
            checked(base, checkpoint)


def test_the_reverse_a_checkpoint_storing_a_head_its_base_ties_is_rejected_naming_it(tmp_path):
    base = save_model(tmp_path / "base", "llama", WORDS, tie_word_embeddings=True)
    checkpoint = finetune(base, tmp_path / "ck", seed=1, tie=False)
    with pytest.raises(RejectedError, match=r"stores 'lm_head.weight', which the base ties to "
                                            r"'model.embed_tokens.weight' and does not store"):
        checked(base, checkpoint)


def test_added_tokens_are_rejected_by_default_naming_them_and_their_number(tmp_path):
    base = save_model(tmp_path / "base", "llama", WORDS)
    checkpoint = finetune(base, tmp_path / "ck", seed=1, added=["<tool>", "<think>", "<a>", "<b>"])
    with pytest.raises(RejectedError) as caught:
        checked(base, checkpoint)
    assert "adds 4 token(s) the base lacks ('<tool>', '<think>', '<a>')" in str(caught.value)
    assert 'vocab = "base"' in str(caught.value)


def test_with_vocab_base_the_added_tokens_are_dropped_and_recorded(tmp_path):
    base = save_model(tmp_path / "base", "llama", WORDS)
    checkpoint = finetune(base, tmp_path / "ck", seed=1, added=["<tool>", "<think>"])
    taken = checked(base, checkpoint, vocab="base")
    assert taken.rows.rows == tuple(range(len(WORDS))) and taken.facts().vocab_dropped == ("<tool>", "<think>")


def test_moved_ids_are_rejected_by_default_and_matched_with_vocab_base(tmp_path):
    base = save_model(tmp_path / "base", "bert", WORDS)
    moved = WORDS[:5] + WORDS[5:][::-1]
    checkpoint = finetune(base, tmp_path / "ck", seed=1, words=moved)
    with pytest.raises(RejectedError, match=r"gives \d+ of the base's tokens other ids"):
        checked(base, checkpoint)
    taken = checked(base, checkpoint, vocab="base")
    assert [moved[r] for r in taken.rows.rows] == WORDS and taken.facts().vocab_dropped == ()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_embeddings_padded_past_the_tokenizer_are_rejected_by_default_and_cut_back_with_vocab_base(tmp_path, family):
    """The same tokens with more rows (``resize_token_embeddings(pad_to_multiple_of=8)``): never read by index."""
    transformers = pytest.importorskip("transformers")
    base = save_model(tmp_path / "base", family, WORDS, tie_word_embeddings=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(len(WORDS), pad_to_multiple_of=8)
    model.save_pretrained(tmp_path / "ck")
    transformers.AutoTokenizer.from_pretrained(base).save_pretrained(tmp_path / "ck")
    with pytest.raises(RejectedError, match=r"has 16 vocabulary rows where the base has 14"):
        checked(base, tmp_path / "ck")
    with receive(tmp_path / "ck", CheckpointFacts("ck")) as taken, ModelFolder.open(base) as opened, \
            ModelFolder.open(tmp_path / "ck") as stored:
        view = taken.check_against_base(opened, "base")
        for name in ("lm_head.weight", *(n for n in opened.tensors if "embed" in n or n.endswith("wte.weight"))):
            assert torch.equal(view.read(name), stored.read(name)[:len(WORDS)]), name


def test_a_resized_checkpoint_without_a_tokenizer_is_rejected_not_truncated(tmp_path):
    base = save_model(tmp_path / "base", "llama", WORDS)
    checkpoint = finetune(base, tmp_path / "ck", seed=1, added=["<tool>"])
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (checkpoint / name).unlink()
    with pytest.raises(RejectedError, match=rf"has {len(WORDS) + 1} vocabulary rows where the base has {len(WORDS)}, "
                                            "and no tokenizer files"):
        checked(base, checkpoint, vocab="base")


def test_a_checkpoint_without_tokenizer_files_and_the_bases_rows_is_read_by_index(tmp_path):
    base = save_model(tmp_path / "base", "llama", WORDS)
    checkpoint = finetune(base, tmp_path / "ck", seed=1)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (checkpoint / name).unlink()
    assert checked(base, checkpoint).rows is None


def test_a_checkpoint_with_another_tokenizer_is_rejected_naming_the_file(tmp_path):
    base = save_model(tmp_path / "base", "gpt2", WORDS)
    checkpoint = finetune(base, tmp_path / "ck", seed=1)
    text = (checkpoint / "tokenizer.json").read_text()
    (checkpoint / "tokenizer.json").write_text(text.replace('"type": "Whitespace"', '"type": "WhitespaceSplit"'))
    with pytest.raises(RejectedError, match=rf"{checkpoint / 'tokenizer.json'} has a different pre_tokenizer"):
        checked(base, checkpoint, vocab="base")


def test_a_base_token_missing_from_the_checkpoints_tokenizer_is_a_rejection_naming_it(tmp_path):
    base = save_model(tmp_path / "base", "llama", WORDS)
    checkpoint = save_model(tmp_path / "ck", "llama", [*WORDS[:-1], "<new>"], seed=1)
    with pytest.raises(RejectedError, match=r"lacks 1 of the base's tokens, first 'far'"):
        checked(base, checkpoint, vocab="base")


def test_vocabulary_tensors_that_disagree_on_the_rows_are_rejected(tmp_path):
    from safetensors.torch import load_file, save_file

    base = save_model(tmp_path / "base", "llama", WORDS)
    checkpoint = finetune(base, tmp_path / "ck", seed=1, added=["<tool>"])
    tensors = load_file(checkpoint / "model.safetensors")
    tensors["lm_head.weight"] = tensors["lm_head.weight"][:-1].clone()
    save_file(tensors, checkpoint / "model.safetensors", metadata={"format": "pt"})
    rows = rf"has {len(WORDS)} rows in 'lm_head.weight' but {len(WORDS) + 1} in 'model.embed_tokens.weight'"
    with pytest.raises(RejectedError, match=rows):
        checked(base, checkpoint, vocab="base")


def test_a_model_without_vocabulary_sized_tensors_has_no_rows_to_match(tmp_path):
    """Its tokenizer is still checked, but the tokens it adds have no rows to drop."""
    from tests.conftest import write_model
    from tests.intake.finetunes import word_tokenizer

    tensors = {"encoder.weight": torch.ones(4, 4)}
    for name, words in (("base", WORDS), ("ck", [*WORDS, "<new>"])):
        write_model(tmp_path / name, tensors)
        word_tokenizer(words).save_pretrained(tmp_path / name)
    assert checked(tmp_path / "base", tmp_path / "ck").rows is None


def test_a_tokenizer_of_a_real_size_is_read_in_this_process_without_a_child(tmp_path, monkeypatch):
    """A child (and, in a fresh `mergeops fold`, its forkserver) costs seconds; a real tokenizer parses in less."""
    base = save_model(tmp_path / "base", "llama", WORDS)
    checkpoint = finetune(base, tmp_path / "ck", seed=1, added=["<new>"])

    def no_child(*args):  # type: ignore[no-untyped-def]
        raise AssertionError("a small tokenizer was read in a child process")

    monkeypatch.setattr(vocab, "run_isolated", no_child)
    assert checked(base, checkpoint, vocab="base").rows is not None


def write_huge_vocabulary(checkpoint, tokens: int) -> None:  # type: ignore[no-untyped-def]
    """A tokenizer.json of ``tokens`` short tokens: well under its size cap, and slow to read (some 4 µs a token)."""
    with open(checkpoint / "tokenizer.json", "w") as f:
        f.write('{"model": {"type": "WordLevel", "vocab": {' + ",".join(f'"t{i}":{i}' for i in range(tokens)) + "}}}")


@pytest.mark.timeout(60)
def test_a_tokenizer_that_takes_longer_than_its_budget_to_read_is_rejected_not_waited_on(tmp_path, monkeypatch):
    base = save_model(tmp_path / "base", "llama", WORDS)
    checkpoint = finetune(base, tmp_path / "ck", seed=1)
    write_huge_vocabulary(checkpoint, 3_000_000)
    monkeypatch.setattr(vocab, "TOKENIZER_SECONDS", 0.5)
    with pytest.raises(RejectedError, match=r"tokenizer files took longer than 0.5 s to read"):  # the child killed
        checked(base, checkpoint, vocab="base")


@pytest.mark.timeout(60)
def test_a_stop_asked_for_while_a_tokenizer_is_read_is_honoured_at_once(tmp_path):
    """The daemon's tick raises when it is asked to stop; a 50 MB vocabulary must not hold it for the 13 s its reading
    takes."""
    base = save_model(tmp_path / "base", "llama", WORDS)
    checkpoint = finetune(base, tmp_path / "ck", seed=1)
    write_huge_vocabulary(checkpoint, 3_000_000)

    class Stop(Exception):
        pass

    ticks = []

    def tick() -> None:
        ticks.append(time.monotonic())
        if len(ticks) > 2:
            raise Stop

    # raised by a tick while the child reads: the read did not hold the caller
    with receive(checkpoint, CheckpointFacts(str(checkpoint))) as taken, ModelFolder.open(base) as opened, \
            pytest.raises(Stop):
        taken.check_against_base(opened, "base", tick)
