"""Tiny real models of each supported family saved by the installed transformers, with real tokenizers: bases and
fine-tunes that tie their embeddings, add tokens or move ids."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = ["[UNK]", "[PAD]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far"]
SMALL = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
CONFIGS = {
    "llama": lambda vocab, **kw: transformers.LlamaConfig(vocab_size=vocab, num_key_value_heads=1, **SMALL | kw),
    "gpt2": lambda vocab, **kw: transformers.GPT2Config(vocab_size=vocab, n_embd=16, n_layer=1, n_head=2,
                                                       bos_token_id=0, eos_token_id=0, **kw),
    "bert": lambda vocab, **kw: transformers.BertConfig(vocab_size=vocab, **SMALL | kw),
}
HEADS = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel", "bert": "BertForMaskedLM"}


def word_tokenizer(words: list[str]):  # type: ignore[no-untyped-def]
    """A word-level tokenizer with ``words`` in id order (transformers' fast tokenizer, no Hub)."""
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")


def save_model(path: Path, family: str, words: list[str] | None = None, *, seed: int = 0, rows: int | None = None,
               **config) -> Path:
    """A random tiny model of ``family`` saved by transformers, with the word tokenizer of ``words`` (none: no
    tokenizer files); ``rows`` embedding rows (default: one per word)."""
    torch.manual_seed(seed)
    model = getattr(transformers, HEADS[family])(CONFIGS[family](rows or len(words or WORDS), **config))
    model.save_pretrained(path)
    if words is not None:
        word_tokenizer(words).save_pretrained(path)
    return path


def finetune(base: Path, out: Path, *, seed: int, added: list[str] = (), words: list[str] | None = None,
             tie: bool | None = None) -> Path:
    """A fine-tune of ``base`` as transformers saves it: the base loaded, its head tied to its input embeddings
    (``tie`` True: the input embeddings' values) or untied, ``added`` tokens added to its tokenizer and the
    embeddings resized, every parameter nudged; ``words`` replaces the tokenizer (moved ids) and reorders the rows to
    match it."""
    model = transformers.AutoModelForMaskedLM.from_pretrained(base) \
        if "Bert" in transformers.AutoConfig.from_pretrained(base).architectures[0] \
        else transformers.AutoModelForCausalLM.from_pretrained(base)
    if tie is not None:
        model.config.tie_word_embeddings = tie
        if tie:
            model.tie_weights()
        else:
            model.get_output_embeddings().weight = torch.nn.Parameter(model.get_input_embeddings().weight.clone())
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    if words is not None:  # the same tokens at other ids: the rows move with them
        order = tokenizer.convert_tokens_to_ids(words)
        with torch.no_grad():  # every tensor with a row per token (parameters() lists a tied one once)
            for parameter in model.parameters():
                if parameter.shape[0] == len(order):
                    parameter.copy_(parameter[order])
        tokenizer = word_tokenizer(words)
    if added:
        tokenizer.add_tokens(list(added))
        model.resize_token_embeddings(len(tokenizer))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.01)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
