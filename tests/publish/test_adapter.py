"""Publishing a version as a PEFT LoRA adapter against the stream's base: PEFT loads it onto the base and computes the
merged model, exactly at a rank that holds every update and with the optimal truncation error below it; it is signed,
recorded, uploaded like a model, and refused where it cannot be what it says."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import (
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)

from mergeops.commit.owner import OWNER_FILE
from mergeops.errors import MergeopsError, PolicyError, UsageError
from mergeops.keys import public_key_for
from mergeops.ledger import Ledger
from mergeops.ledger.audit import audit
from mergeops.ledger.kinds import PublicationRecorded
from mergeops.model import folder_digest
from mergeops.model.readme import read_front_matter
from mergeops.model.signing import verify_model_folder
from mergeops.pipeline import fold_checkpoint
from mergeops.policy import load_policy
from mergeops.publish.adapter import write_adapter
from mergeops.publish.publish import publish
from tests.conftest import write_model
from tests.fold.streams import read_model, write_policy
from tests.registry.hub_server import HubServer, hub_server_fixture  # noqa: F401 (fixture)

pytestmark = pytest.mark.timeout(240)

TOKENS = torch.tensor([[3, 14, 15, 9, 26, 5, 35, 8]])


def tiny_llama() -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                        tie_word_embeddings=False))


def tiny_gpt2() -> GPT2LMHeadModel:  # tied head, Conv1D weights stored [in, out], biases and LayerNorms
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32))


def tiny_bert_mlm() -> BertForMaskedLM:  # the MLM decoder tied to the word embeddings, its bias to cls.predictions
    return BertForMaskedLM(BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      vocab_size=64, max_position_embeddings=32))


def fine_tune(base: Path, out: Path, seed: int) -> Path:
    """A real fine-tune: a few AdamW steps of next-token loss on random tokens, saved by transformers."""
    model = _load(base)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(3):
        batch = torch.randint(0, 64, (4, 12), generator=generator)
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    return out


def _load(folder: Path) -> PreTrainedModel:
    config = json.loads((folder / "config.json").read_text())
    model_class = {"gpt2": GPT2LMHeadModel, "bert": BertForMaskedLM}.get(config["model_type"], LlamaForCausalLM)
    return model_class.from_pretrained(folder).eval()


def stream_of(tmp_path: Path, model: PreTrainedModel, publish_table: str) -> Path:
    """A base saved by transformers, a policy averaging fine-tunes of it, two of them folded; the policy's path."""
    torch.manual_seed(0)
    model.save_pretrained(tmp_path / "base")
    path = write_policy(tmp_path, tmp_path / "base", "average")
    path.write_text(path.read_text() + publish_table)
    policy = load_policy(path)
    for seed in (1, 2):
        result = fold_checkpoint(policy, "s", fine_tune(tmp_path / "base", tmp_path / f"ft{seed}", seed))
        assert result.status == "merged", result.reason
    return path


def logits_with_adapter(base: Path, adapter: Path) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a missing or unexpected adapter key is a UserWarning
        warnings.filterwarnings("ignore", message="fan_in_fan_out is set to True but the target module is")
        # peft knows no tie of BERT's MLM decoder; the adapter carries the same factors for both, checked below
        warnings.filterwarnings("ignore", message="You have requested `ensure_weight_tying`")
        model = PeftModel.from_pretrained(_load(base), adapter).eval()
    with torch.no_grad():
        return model(TOKENS).logits


def logits_of(folder: Path) -> torch.Tensor:
    with torch.no_grad():
        return _load(folder)(TOKENS).logits


def optimal_error(delta: torch.Tensor, rank: int) -> float:
    """The Eckart–Young error of the best rank-``rank`` approximation, from the singular values."""
    s = torch.linalg.svdvals(delta.double())
    return float(s[rank:].square().sum().sqrt() / s.square().sum().sqrt())


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2, tiny_bert_mlm], ids=["llama", "gpt2", "bert-mlm"])
def test_at_full_rank_the_adapter_on_the_base_computes_the_merged_model(tmp_path, make):
    policy = load_policy(stream_of(tmp_path, make(), f'[streams.s.publish]\nto = "{tmp_path / "pub"}"\n'
                                   "as_adapter = {rank = 64}\n"))
    publication = publish(policy, "s")
    adapter = tmp_path / "pub" / "v0002-lora-r64"
    assert publication.targets == (str(adapter),)
    assert sorted(p.name for p in adapter.iterdir()) == ["README.md", "adapter_config.json",
                                                         "adapter_model.safetensors", "model.sig"]
    report = publication.adapter
    assert report is not None and report.rank == 64 and report.error < 1e-5  # float32 SVD round-off
    assert report.errors and max(report.errors.values()) < 1e-5
    merged = logits_of(tmp_path / "out" / "v0002")
    assert (merged - logits_of(tmp_path / "base")).abs().max() > 1e-2  # the fine-tunes changed the outputs
    torch.testing.assert_close(logits_with_adapter(tmp_path / "base", adapter), merged, rtol=1e-4, atol=1e-4)


def test_below_the_true_rank_each_error_is_the_optimal_truncation_error_and_peft_applies_exactly_that(tmp_path):
    policy = load_policy(stream_of(tmp_path, tiny_llama(), f'[streams.s.publish]\nto = "{tmp_path / "pub"}"\n'))
    report = publish(policy, "s", as_adapter=3).adapter
    assert report is not None
    adapter = tmp_path / "pub" / "v0002-lora-r3"
    version = load_file(tmp_path / "out" / "v0002" / "model.safetensors")
    base = load_file(tmp_path / "base" / "model.safetensors")
    linear = [n for n in version if n.endswith("proj.weight") or n == "lm_head.weight"]
    assert set(linear) <= set(report.errors)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        applied = PeftModel.from_pretrained(_load(tmp_path / "base"), adapter).merge_and_unload().state_dict()
    residual = total = 0.0
    for name in report.errors:
        delta = version[name].double() - base[name].double()
        assert report.errors[name] == pytest.approx(optimal_error(delta, 3), rel=1e-4, abs=1e-6), name
        # what PEFT adds to the base weight is B·A: its distance to ΔW is the reported error
        peft_delta = applied[name].double() - base[name].double()
        assert float((delta - peft_delta).norm() / delta.norm()) == pytest.approx(report.errors[name], rel=1e-3)
        residual += float((delta - peft_delta).norm()) ** 2
        total += float(delta.norm()) ** 2
    assert report.error == pytest.approx(math.sqrt(residual / total), rel=1e-3)
    assert 0.01 < report.error < 1
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (3, 3, "LORA")
    card = (adapter / "README.md").read_text()
    assert f"{report.errors['model.layers.0.mlp.down_proj.weight']:.3e}" in card
    assert f"{report.error:.3e}" in card


def test_keys_config_and_shapes_are_what_peft_itself_saves_for_that_config(tmp_path):
    """GPT-2: Conv1D weights (fan_in_fan_out), biases (bias="all", a targeted module's in its base_layer), LayerNorms
    (modules_to_save, whole), embeddings (embedding LoRA) and the head tied to wte."""
    policy = load_policy(stream_of(tmp_path, tiny_gpt2(), f'[streams.s.publish]\nto = "{tmp_path / "pub"}"\n'))
    report = publish(policy, "s", as_adapter=8).adapter
    assert report is not None and report.not_carried == {}
    adapter = tmp_path / "pub" / "v0002-lora-r8"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] and config["bias"] == "all" and config["ensure_weight_tying"]
    assert "transformer.h.0.attn.c_attn" in config["target_modules"] and "lm_head" in config["target_modules"]
    assert "transformer.h.0.ln_1" in config["modules_to_save"]
    ours = {k: tuple(v.shape) for k, v in load_file(adapter / "adapter_model.safetensors").items()}
    reference = get_peft_model(_load(tmp_path / "base"), LoraConfig(**{k: v for k, v in config.items()
                                                                       if k != "peft_type"}))
    reference.save_pretrained(tmp_path / "reference")
    saved = {k: tuple(v.shape) for k, v in load_file(tmp_path / "reference" / "adapter_model.safetensors").items()}
    # PEFT saves every bias under bias="all"; ours holds the changed ones, every other key is the same
    assert {k: s for k, s in saved.items() if k in ours} == ours
    assert all(k.endswith("bias") for k in saved.keys() - ours.keys())
    assert "base_model.model.transformer.h.0.attn.c_attn.base_layer.bias" in ours
    assert "base_model.model.transformer.wte.lora_embedding_A" in ours
    front = read_front_matter(adapter)
    assert front["base_model"] == "base" and front["library_name"] == "peft" and "mergeops" in front["tags"]


def test_signed_recorded_audited_and_reported_as_json(tmp_path):
    path = stream_of(tmp_path, tiny_llama(), f'[streams.s.publish]\nto = "{tmp_path / "pub"}"\n'
                     "as_adapter = {rank = 4}\n")
    done = subprocess.run([sys.executable, "-m", "mergeops", "publish", "--policy", str(path), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    adapter = tmp_path / "pub" / "v0002-lora-r4"
    assert document["targets"] == [str(adapter)] and document["digest"] == folder_digest(adapter)
    assert document["adapter"]["rank"] == 4 and 0 < document["adapter"]["error"] < 1
    tensors = document["adapter"]["tensors"]
    assert tensors["model.layers.0.self_attn.q_proj.weight"]["rank"] == 4
    assert "model.norm.weight" in document["adapter"]["exact"]
    policy = load_policy(path)
    assert verify_model_folder(adapter, [tmp_path / "keys" / "signing.pub.pem"]) == document["signed_by"]
    with Ledger.open_readonly(policy.home) as ledger:
        assert audit(ledger, public_key_for(policy.keys)).problems == []
        (payload,) = [json.loads(e["payload"]) for e in ledger.events() if e["kind"] == PublicationRecorded.kind]
    event = PublicationRecorded.from_payload(payload)
    assert payload["adapter"] == event.adapter == {"rank": 4, "error": document["adapter"]["error"]}
    assert event.output_digest == folder_digest(adapter) and event.files.keys() == {
        "README.md", "adapter_config.json", "adapter_model.safetensors", "model.sig"}
    # a full model's publication payload is what it always was: no adapter key
    assert "adapter" not in PublicationRecorded("s", 1, "sha256:1", "pub/v0001", None).payload()


def test_published_to_the_hub_as_one_commit_of_the_adapter(tmp_path, hub_server: HubServer):
    hub_server.add_commit({".gitattributes": b"*.safetensors filter=lfs\n"}, repo="acme/adapter", title="initial")
    policy = load_policy(stream_of(tmp_path, tiny_llama(), '[streams.s.publish]\nhub = "acme/adapter"\n'
                                   "as_adapter = {rank = 2}\n"))
    publication = publish(policy, "s")
    commit = hub_server.repos["acme/adapter"].commits[-1]
    assert publication.targets == (f"hf://acme/adapter@{commit.sha}",)
    assert set(commit.files) == {".gitattributes", "README.md", "adapter_config.json", "adapter_model.safetensors",
                                 "model.sig"}
    assert "v0002-lora-r2" in commit.title


def test_a_change_a_lora_cannot_carry_is_reported_not_dropped(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"layer.proj.weight": torch.randn(8, 6, generator=g), "layer.kernel": torch.randn(2, 3, 4, generator=g),
            "layer.norm.weight": torch.ones(6), "layer.untouched.weight": torch.randn(4, 4, generator=g)}
    version = dict(base, **{"layer.proj.weight": base["layer.proj.weight"] + 0.1,
                            "layer.kernel": base["layer.kernel"] * 1.5, "layer.norm.weight": torch.full((6,), 2.0)})
    write_model(tmp_path / "base", base)
    write_model(tmp_path / "version", version)
    report = write_adapter(tmp_path / "version", tmp_path / "base", tmp_path / "adapter", 4, base_name="base",
                           title="s v0001")
    assert report.not_carried == {"layer.kernel": pytest.approx(0.5)}
    assert report.exact == ["layer.norm.weight"] and report.unchanged == 1
    assert report.errors == {"layer.proj.weight": pytest.approx(0, abs=1e-6)}  # a constant shift is rank 1
    assert "**Not carried**" in (tmp_path / "adapter" / "README.md").read_text()
    assert "| `layer.kernel` | 5.000e-01 |" in (tmp_path / "adapter" / "README.md").read_text()


@pytest.mark.parametrize(("table", "message"), [
    ("protect = true\nas_adapter = {rank = 8}", r"protect = true and as_adapter, which cannot go together: MergeLock"),
    ("as_adapter = {rank = 0}", r"as_adapter.rank must be between 1 and 4096, not 0"),
    ("as_adapter = {rank = 100000}", r"as_adapter.rank must be between 1 and 4096, not 100000"),
    ('as_adapter = {rank = "64"}', r"as_adapter.rank must be a int, not '64'"),
    ("as_adapter = {}", r"as_adapter needs a 'rank' key"),
    ("as_adapter = {rank = 8, rnk = 8}", r"unknown key 'rnk' .*as_adapter \(did you mean 'rank'\?\)"),
    ("as_adapter = 8", r"as_adapter must be a dict, not 8"),
], ids=["protect", "zero", "huge", "string", "no-rank", "typo", "not-a-table"])
def test_protect_with_an_adapter_and_bad_ranks_are_policy_errors(tmp_path, table, message):
    path = write_policy(tmp_path, tmp_path / "base", "average")
    path.write_text(path.read_text() + f'[streams.s.publish]\nto = "{tmp_path / "pub"}"\n{table}\n')
    with pytest.raises(PolicyError, match=message):
        load_policy(path)


def test_refusals_publish_nothing_and_record_nothing(tmp_path):
    path = stream_of(tmp_path, tiny_llama(), f'[streams.s.publish]\nto = "{tmp_path / "pub"}"\n')
    policy = load_policy(path)
    with pytest.raises(UsageError, match=r"rank must be between 1 and 4096, not 0"):
        publish(policy, "s", as_adapter=0)
    locked = path.read_text().replace('signing = "keys/signing.pem"',
                                      'signing = "keys/signing.pem"\nlock = "keys/lock.key"')
    path.write_text(locked + "protect = true\n")
    with pytest.raises(UsageError, match=r"an adapter cannot be protected"):
        publish(load_policy(path), "s", as_adapter=8)
    # the base changed since the stream started: an adapter against it would be wrong
    weights = tmp_path / "base" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(MergeopsError, match=r"is not the one the stream started from .*restore that base"):
        publish(policy, "s", as_adapter=8)
    # nothing but the folder's owner marker, written when the folder was first claimed
    assert not (tmp_path / "pub").exists() or [p.name for p in (tmp_path / "pub").iterdir()] == [OWNER_FILE]
    with Ledger.open_readonly(policy.home) as ledger:
        assert ledger.publications("s", 2) == []
    done = subprocess.run([sys.executable, "-m", "mergeops", "publish", "--policy", str(path), "--as-adapter", "8"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "an adapter cannot be protected" in done.stderr


def test_an_adapter_published_from_a_stream_of_adapters_folds_back_into_the_version(tmp_path):
    """Adapters out, then in: the version of a stream of LoRA adapters, published as an adapter at a rank that holds
    its update, folds into a new stream of the same base (task arithmetic, λ = 1) as that version."""
    from tests.adapters import make_adapter, tiny_base

    base = tiny_base(tmp_path, "llama")
    path = write_policy(tmp_path, base, "average")
    path.write_text(path.read_text() + f'[streams.s.publish]\nto = "{tmp_path / "pub"}"\nas_adapter = {{rank = 16}}\n')
    policy = load_policy(path)
    for seed, targets in ((1, ["q_proj", "v_proj"]), (2, ["v_proj", "down_proj"])):
        adapter = make_adapter(base, tmp_path / f"a{seed}", seed=seed, rank=4, targets=targets)
        assert fold_checkpoint(policy, "s", adapter).status == "merged"
    publication = publish(policy, "s")
    assert publication.adapter is not None and publication.adapter.error < 1e-5
    again = load_policy(write_policy(tmp_path / "again", base, "task_arithmetic", {"lambda": 1.0}))
    result = fold_checkpoint(again, "s", Path(publication.targets[0]))
    assert result.status == "merged", result.reason
    version, base_values = read_model(tmp_path / "out" / "v0002"), read_model(base)
    folded_back = read_model(result.output)
    for name, value in version.items():
        update = (value - base_values[name]).abs().max()
        assert float((folded_back[name] - value).abs().max()) <= 1e-5 * max(float(update), 1e-6), name


def test_lineage_of_a_published_adapter_names_its_version(tmp_path):
    """"Where did this model come from?" holds for an adapter mergeops published: found by its folder digest among
    the publications, and answered with its version's lineage."""
    from mergeops.ledger.lineage import lineage

    policy = load_policy(stream_of(tmp_path, tiny_llama(), f'[streams.s.publish]\nto = "{tmp_path / "pub"}"\n'
                                   "as_adapter = {rank = 8}\n"))
    publication = publish(policy, "s")
    with Ledger.open_readonly(policy.home) as ledger:
        document = lineage(ledger, publication.targets[0])
    assert document["found"]["as"] == "published copy" and document["version"] == 2
    assert document["found"]["digest"] == folder_digest(Path(publication.targets[0]))
    assert [step["version"] for step in document["steps"]] == [2, 1]
