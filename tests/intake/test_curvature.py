"""optimizer.pt -> exp_avg_sq.safetensors: every tensor lands under the right name, or the import refuses.

Checkpoints are real: tiny transformers models trained for two steps with the optimizer grouped by the
Trainer's own code (and, where accelerate is installed, by a real ``transformers.Trainer`` run), and each
imported tensor is compared with the live optimizer's state for the very same parameter object.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from mergeops.errors import ModelFolderError, RejectedError, UsageError
from mergeops.intake.curvature import CURVATURE_FILE, OPTIMIZER_FILE, import_trainer_curvature

transformers = pytest.importorskip("transformers")

VOCAB = 64


def tiny_model(kind: str, **overrides: object) -> nn.Module:
    """A randomly initialised model of hidden size 32 and 2 layers; no download."""
    torch.manual_seed(0)
    if kind == "bert":
        config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, max_position_embeddings=32, num_labels=2)
        config.update(overrides)
        return transformers.BertForSequenceClassification(config)
    if kind == "llama":
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                          num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32,
                                          bos_token_id=1, eos_token_id=2, pad_token_id=0)
        config.update(overrides)
        return transformers.LlamaForCausalLM(config)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=32,
                                     bos_token_id=1, eos_token_id=2)  # ties lm_head to wte
    config.update(overrides)
    return transformers.GPT2LMHeadModel(config)


def batch(model: nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (4, 8), generator=generator)
    if model.config.model_type == "bert":
        return {"input_ids": ids, "labels": torch.randint(0, 2, (4,), generator=generator)}
    return {"input_ids": ids, "labels": ids}


def trainer_groups(model: nn.Module, decay_names: list[str] | set[str]) -> list[dict]:
    """Trainer.create_optimizer's two groups, verbatim."""
    return [
        {"params": [p for n, p in model.named_parameters() if n in decay_names and p.requires_grad],
         "weight_decay": 0.01},
        {"params": [p for n, p in model.named_parameters() if n not in decay_names and p.requires_grad],
         "weight_decay": 0.0},
    ]


def train_checkpoint(folder: Path, model: nn.Module, *, optimizer: str = "adamw",
                     decay_names: list[str] | set[str] | None = None) -> torch.optim.Optimizer:
    """Two real steps with the Trainer's grouping, saved as a Trainer checkpoint saves them."""
    if decay_names is None:  # the installed Trainer's own rule (the method does not use self)
        decay_names = transformers.Trainer.get_decay_parameter_names(None, model)
    groups = trainer_groups(model, decay_names)
    if optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=1e-3)
    else:
        opt = torch.optim.SGD(groups, lr=1e-3, momentum=0.9)
    generator = torch.Generator().manual_seed(1)
    for _ in range(2):
        model(**batch(model, generator)).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(folder)
    torch.save(opt.state_dict(), folder / OPTIMIZER_FILE)
    return opt


def assert_matches_live_state(out: Path, folder: Path, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Every parameter the checkpoint stores carries exactly the live optimizer's exp_avg_sq for it."""
    assert out == folder / CURVATURE_FILE
    imported = load_file(out)
    stored = set(load_file(folder / "model.safetensors"))
    expected = {n for n, _ in model.named_parameters(remove_duplicate=False) if n in stored}
    assert set(imported) == expected
    for name, param in model.named_parameters(remove_duplicate=False):
        if name in stored:
            want = opt.state[param]["exp_avg_sq"]
            assert imported[name].dtype == torch.float32
            assert torch.equal(imported[name], want), name
    assert not [p for p in folder.iterdir() if p.name.startswith(".")], "temp file left behind"


@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
def test_import_matches_optimizer_state(tmp_path: Path, kind: str) -> None:
    model = tiny_model(kind)
    opt = train_checkpoint(tmp_path, model)
    assert_matches_live_state(import_trainer_curvature(tmp_path), tmp_path, model, opt)


def test_tied_weights_written_under_every_stored_name(tmp_path: Path) -> None:
    model = tiny_model("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    opt = train_checkpoint(tmp_path, model)
    weights = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in weights  # save_pretrained drops the tied copy: store it too, as some tools do
    weights["lm_head.weight"] = weights["transformer.wte.weight"].clone()
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})

    imported = load_file(import_trainer_curvature(tmp_path))
    want = opt.state[model.transformer.wte.weight]["exp_avg_sq"]
    assert torch.equal(imported["lm_head.weight"], want)
    assert torch.equal(imported["transformer.wte.weight"], want)


def test_real_trainer_checkpoint(tmp_path: Path) -> None:
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    model = tiny_model("llama")
    generator = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, VOCAB, (8, 8), generator=generator)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, save_strategy="steps", save_steps=2,
        learning_rate=1e-3, weight_decay=0.01, report_to=[], use_cpu=True, logging_strategy="no",
        disable_tqdm=True, remove_unused_columns=False)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    checkpoint = tmp_path / "checkpoint-2"
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # unwrap accelerate's wrapper
    assert [len(g["params"]) for g in opt.param_groups] == [16, 5]  # RMSNorm weights are no-decay
    assert_matches_live_state(import_trainer_curvature(checkpoint), checkpoint, trainer.model, opt)


def test_pre_4_49_grouping_is_recognised(tmp_path: Path) -> None:
    """Older Trainers excluded only nn.LayerNorm and biases from weight decay: Llama's RMSNorm decayed."""
    model = tiny_model("llama")
    legacy = {n for n, _ in model.named_parameters() if "bias" not in n}  # Llama has no LayerNorm or bias
    opt = train_checkpoint(tmp_path, model, decay_names=legacy)
    assert [len(g["params"]) for g in opt.param_groups] == [21, 0]
    assert_matches_live_state(import_trainer_curvature(tmp_path), tmp_path, model, opt)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_param_names_fallback(tmp_path: Path, kind: str) -> None:
    model = tiny_model(kind)
    opt = train_checkpoint(tmp_path, model)
    (tmp_path / "config.json").unlink()  # not needed when the order is given
    names = [n for n, _ in model.named_parameters()]
    assert_matches_live_state(import_trainer_curvature(tmp_path, param_names=names), tmp_path, model, opt)


def test_without_transformers_param_names_are_required(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model("gpt2")
    opt = train_checkpoint(tmp_path, model)
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    with pytest.raises(UsageError, match=r"transformers is not installed.*param_names"):
        import_trainer_curvature(tmp_path)
    names = [n for n, _ in model.named_parameters()]
    imported = load_file(import_trainer_curvature(tmp_path, param_names=names))
    assert set(imported) == set(names)  # tied lm_head is not stored, and unknown without the model
    for name, param in model.named_parameters():
        assert torch.equal(imported[name], opt.state[param]["exp_avg_sq"]), name


def test_optimizer_of_another_shape_is_named(tmp_path: Path) -> None:
    train_checkpoint(tmp_path, tiny_model("llama"))
    other = tmp_path / "other"
    train_checkpoint(other, tiny_model("llama", intermediate_size=48))  # same parameter count, other shapes
    shutil.copy(other / OPTIMIZER_FILE, tmp_path / OPTIMIZER_FILE)
    with pytest.raises(RejectedError) as caught:
        import_trainer_curvature(tmp_path)
    message = str(caught.value)
    assert "'model.layers.0.mlp.gate_proj.weight'" in message
    assert "(48, 32)" in message and "(64, 32)" in message
    assert not (tmp_path / CURVATURE_FILE).exists()


def test_optimizer_of_another_size_is_refused(tmp_path: Path) -> None:
    train_checkpoint(tmp_path, tiny_model("bert"))
    other = tmp_path / "other"
    train_checkpoint(other, tiny_model("bert", num_hidden_layers=1))
    shutil.copy(other / OPTIMIZER_FILE, tmp_path / OPTIMIZER_FILE)
    with pytest.raises(RejectedError, match=r"holds 25 parameters but the BertForSequenceClassification .* has 41"):
        import_trainer_curvature(tmp_path)


def test_sgd_has_no_second_moment(tmp_path: Path) -> None:
    train_checkpoint(tmp_path, tiny_model("bert"), optimizer="sgd")
    with pytest.raises(RejectedError, match=r"no exp_avg_sq for parameter id 0 \(its state holds: momentum_buffer\)"):
        import_trainer_curvature(tmp_path)


@pytest.mark.parametrize("missing", [OPTIMIZER_FILE, "config.json"])
def test_missing_file(tmp_path: Path, missing: str) -> None:
    train_checkpoint(tmp_path, tiny_model("bert"))
    (tmp_path / missing).unlink()
    with pytest.raises(ModelFolderError, match=re.escape(f"{tmp_path / missing} does not exist")):
        import_trainer_curvature(tmp_path)


def test_name_not_in_checkpoint(tmp_path: Path) -> None:
    model = tiny_model("bert")
    train_checkpoint(tmp_path, model)
    names = [n for n, _ in model.named_parameters()]
    names[3] = "bert.encoder.layer.9.output.dense.weight"
    with pytest.raises(RejectedError, match=r"'bert\.encoder\.layer\.9\.output\.dense\.weight', which is not a tensor"):
        import_trainer_curvature(tmp_path, param_names=names)


def test_refuses_pickled_code(tmp_path: Path) -> None:
    train_checkpoint(tmp_path, tiny_model("bert"))
    torch.save({"state": {}, "param_groups": [], "payload": Path("x")}, tmp_path / OPTIMIZER_FILE)
    with pytest.raises(RejectedError, match=r"\(Unsupported global: GLOBAL pathlib\.PosixPath\)"):
        import_trainer_curvature(tmp_path)
    (tmp_path / OPTIMIZER_FILE).write_bytes(b"not a torch file")
    with pytest.raises(RejectedError, match="cannot be loaded as a weights-only torch file"):
        import_trainer_curvature(tmp_path)


def test_output_is_plain_float32_safetensors(tmp_path: Path) -> None:
    model = tiny_model("llama").to(torch.bfloat16)
    train_checkpoint(tmp_path, model)
    out = import_trainer_curvature(tmp_path)
    with safe_open(out, "pt") as f:
        assert {f.get_slice(n).get_dtype() for n in f.keys()} == {"F32"}  # noqa: SIM118 (safe_open has no __iter__)
        shapes = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}  # noqa: SIM118
    assert shapes == {n: tuple(p.shape) for n, p in model.named_parameters()}
