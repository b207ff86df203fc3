"""MergeLock's contract around the math: keys and metadata, refusals before anything is written, streaming,
the model card, the ledger payload, and the checks it reports."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mergeops import keys
from mergeops.errors import UsageError
from mergeops.ledger.kinds import ProtectionRecorded
from mergeops.ledger.store import Ledger
from mergeops.model import ModelFolder, folder_digest
from mergeops.protect import DEFAULT_STRENGTH, is_protected, protect, unprotect
from mergeops.protect.architectures import resolve
from mergeops.protect.transforms import SCHEME, layer_transform
from tests.protect.conftest import KEY, OTHER_KEY, transformers


def files_in(path):
    return sorted(p.name for p in path.iterdir())


def test_metadata_records_scheme_salt_strength_and_check_tag_but_never_the_key(model_dir, tmp_path):
    source = model_dir("llama-gqa")
    protect(source, tmp_path / "a", KEY)
    protect(source, tmp_path / "b", KEY, random_salt=True)
    with safe_open(tmp_path / "a" / "model.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["mergelock.scheme"] == SCHEME == "mergelock-v2" and meta["mergelock.version"] == "2"
    assert len(bytes.fromhex(meta["mergelock.salt"])) == 16 and len(meta["mergelock.check"]) == 64
    assert meta["mergelock.strength"] == str(DEFAULT_STRENGTH)
    for path in (tmp_path / "a").iterdir():  # neither the key nor its hex appears anywhere
        data = path.read_bytes()
        assert KEY not in data and KEY.hex().encode() not in data
    with safe_open(tmp_path / "b" / "model.safetensors", "pt") as f:
        assert f.metadata()["mergelock.salt"] != meta["mergelock.salt"]  # --salt random: a fresh salt...
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], b["model.layers.0.self_attn.q_proj.weight"])
    unprotect(tmp_path / "b", tmp_path / "b-open", KEY)  # ...and each unprotects with the same key
    assert is_protected(tmp_path / "a") and not is_protected(tmp_path / "b-open")
    assert folder_digest(tmp_path / "b-open") == folder_digest(source)


def test_transforms_are_reproducible_from_key_and_salt_and_independent_per_layer(model_dir):
    with ModelFolder.open(model_dir("llama-gqa")) as folder:
        first, second = resolve(folder).units
    salt = bytes(16)

    def q(key: bytes, salt: bytes, unit, strength: int = 4) -> torch.Tensor:
        t = layer_transform(key, salt, unit, strength).q
        return torch.stack([t.perm.double(), t.coef])

    assert torch.equal(q(KEY, salt, first), q(KEY, salt, first))
    for other in (q(KEY, salt, second), q(OTHER_KEY, salt, first), q(KEY, bytes(15) + b"\1", first)):
        assert not torch.equal(q(KEY, salt, first), other)
    t = layer_transform(KEY, salt, first, 4)
    assert set(t.q.coef.abs().tolist()) <= {2.0 ** 4, 2.0 ** -4} and set(t.v.coef.abs().tolist()) <= {16.0, 1 / 16}
    assert torch.equal(t.k.coef, 1 / t.v.coef) is False  # query/key and value/output maps are independent
    assert set(layer_transform(KEY, salt, first, 0).q.coef.abs().tolist()) == {1.0}  # strength 0: permutations
    inverse = t.up.inverse()
    x = torch.randn(len(t.up), 3, dtype=torch.float64)
    assert torch.equal(inverse.apply(t.up.apply(x, 0), 0), x)


def test_wrong_key_is_refused_and_nothing_is_written(model_dir, tmp_path):
    protect(model_dir("bert"), tmp_path / "locked", KEY)
    with pytest.raises(UsageError, match="different lock key"):
        unprotect(tmp_path / "locked", tmp_path / "out", OTHER_KEY)
    assert files_in(tmp_path) == ["bert-0", "locked"]


def test_unprotecting_a_plain_model_and_protecting_twice_are_refused(model_dir, tmp_path):
    source = model_dir("bert")
    with pytest.raises(UsageError, match="not MergeLock-protected"):
        unprotect(source, tmp_path / "out", KEY)
    protect(source, tmp_path / "locked", KEY)
    with pytest.raises(UsageError, match="already MergeLock-protected"):
        protect(tmp_path / "locked", tmp_path / "twice", KEY)
    with pytest.raises(UsageError, match="32 random bytes"):
        protect(source, tmp_path / "short", b"too short")
    with pytest.raises(UsageError, match="already exists"):
        protect(source, tmp_path / "locked", KEY)
    for strength in (-1, 31, 2.5, True):
        with pytest.raises(UsageError, match="strength must be a whole number from 0 to 30"):
            protect(source, tmp_path / "bad", KEY, strength=strength)
    assert files_in(tmp_path) == ["bert-0", "locked"]


def test_damaged_mergelock_metadata_is_refused_by_unprotect(model_dir, tmp_path):
    from safetensors.torch import save_file

    source = model_dir("bert")
    protect(source, tmp_path / "locked", KEY)
    weights = tmp_path / "locked" / "model.safetensors"
    with safe_open(weights, "pt") as f:
        meta = f.metadata()
    tensors = load_file(weights)
    for key, value in (("mergelock.header", "{}"), ("mergelock.strength", "nan"), ("mergelock.salt", "zz")):
        save_file(tensors, weights, metadata=meta | {key: value})
        with pytest.raises(UsageError, match="damaged"):
            unprotect(tmp_path / "locked", tmp_path / "out", KEY)
        assert not (tmp_path / "out").exists()


def replace_once(path, old: bytes, new: bytes) -> None:
    """Edit ``path`` in place, same length: the safetensors layout stays valid, only the meaning changes."""
    data = path.read_bytes()
    assert len(old) == len(new) and data.count(old) == 1, (old, data.count(old))
    path.write_bytes(data.replace(old, new))


def flip_last_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.timeout(300)
def test_unprotect_writes_nothing_unless_the_restored_files_are_the_recorded_source(model_dir, tmp_path):
    """Each edit passes every check on the metadata alone; only hashing what was restored shows that it is not the
    source, and then `mergeops unprotect` exits 1, prints no "restored" and leaves no folder behind."""
    import shutil
    import subprocess

    source = model_dir("bert")
    protect(source, tmp_path / "locked", KEY, strength=6)
    key = tmp_path / "lock.key"
    key.write_bytes(KEY)
    key.chmod(0o600)
    weights, provenance = "model.safetensors", "provenance.json"
    recorded = json.loads((tmp_path / "locked" / provenance).read_text())["predicate"]["source"]["digest"]
    edits = {
        "strength in the metadata": lambda d: replace_once(d / weights, b'"mergelock.strength":"6"',
                                                           b'"mergelock.strength":"5"'),
        "a tensor's bytes": lambda d: flip_last_byte(d / weights),
        "the kept original header": lambda d: replace_once(d / weights, b'\\"format\\":\\"pt\\"',
                                                           b'\\"format\\":\\"tf\\"'),
        "the recorded source digest": lambda d: replace_once(d / provenance, recorded.encode(),
                                                             recorded[:-1].encode() + b"0" if recorded[-1] != "0"
                                                             else recorded[:-1].encode() + b"1"),
        "a removed provenance.json": lambda d: (d / provenance).unlink(),
    }
    for what, edit in edits.items():
        copy = shutil.copytree(tmp_path / "locked", tmp_path / "edited")
        edit(copy)
        out = tmp_path / "out"
        result = subprocess.run([sys.executable, "-m", "mergeops", "unprotect", str(copy), "--out", str(out),
                                 "--key", str(key)], capture_output=True, text=True, timeout=120)
        assert result.returncode == 1, (what, result.stdout, result.stderr)
        assert "restored" not in result.stdout and "Nothing was written" in result.stderr, what
        assert files_in(tmp_path) == ["bert-0", "edited", "lock.key", "locked"], what  # no --out, no staging
        shutil.rmtree(copy)
    restored = unprotect(tmp_path / "locked", tmp_path / "out", KEY)  # the untouched copy restores the source
    assert restored["output_digest"] == folder_digest(source) == recorded


def test_an_unsupported_architecture_is_refused_before_anything_is_written(tmp_path):
    config = transformers.GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                        intermediate_size=64)
    transformers.GPTNeoXForCausalLM(config).save_pretrained(tmp_path / "neox")
    with pytest.raises(UsageError) as caught:
        protect(tmp_path / "neox", tmp_path / "out", KEY)
    message = str(caught.value)
    assert "GPTNeoXForCausalLM" in message and "gpt_neox" in message
    assert "BERT, RoBERTa, ViT, CLIP, GPT-2, Llama, Mistral, Qwen2" in message
    assert files_in(tmp_path) == ["neox"]  # no output, no temporary folder


def test_a_folder_without_config_is_refused(model_dir, tmp_path):
    source = model_dir("bert")
    (source / "config.json").unlink()
    with pytest.raises(UsageError, match=r"no config\.json"):
        protect(source, tmp_path / "out", KEY)
    assert not (tmp_path / "out").exists()


def test_streams_each_tensor_once_and_carries_config_tokenizer_and_a_card(model_dir, tmp_path, monkeypatch):
    source = model_dir("gpt2-lm")
    (source / "tokenizer.json").write_text('{"model": {}}')
    reads: list[str] = []
    original_read = ModelFolder.read
    monkeypatch.setattr(ModelFolder, "read", lambda self, name: reads.append(name) or original_read(self, name))
    report = protect(source, tmp_path / "locked", KEY)
    assert sorted(reads) == sorted(load_file(source / "model.safetensors"))  # one pass, every tensor once
    layer_of = [int(n.split(".h.")[1].split(".")[0]) for n in reads if ".attn.c_" in n]
    assert layer_of == sorted(layer_of)  # one layer's attention at a time
    out = tmp_path / "locked"
    assert {"config.json", "tokenizer.json", "generation_config.json", "README.md", "model.safetensors"} <= set(
        files_in(out))
    card = (out / "README.md").read_text()
    assert "MergeLock-protected" in card and "same function" in card and report["output_digest"] in card
    assert report["output_digest"] == folder_digest(out) and report["source_digest"] == folder_digest(source)


def test_protected_card_keeps_base_model_license_and_the_source_provenance(model_dir, tmp_path):
    source = model_dir("bert")
    original_card = '---\nbase_model:\n- "org/bert-base"\nlicense: mit\n---\n# a fine-tune\n'
    (source / "README.md").write_text(original_card)
    (source / "provenance.json").write_text('{"_type": "https://in-toto.io/Statement/v1", "x": 1}\n')
    (source / "trainer_state.json").write_text('{"global_step": 5}')
    (source / "optimizer.pt").write_bytes(b"not carried")
    report = protect(source, tmp_path / "locked", KEY)
    card = (tmp_path / "locked" / "README.md").read_text()
    assert '- "org/bert-base"' in card and "license: mit" in card
    assert "What a merge does to it" in card and "broken model" in card
    for part in report["transformed"]:
        assert part in card.replace("\n", " ")
    assert any("MLP" in p for p in report["transformed"]) and any("value/output" in p for p in report["transformed"])
    provenance = json.loads((tmp_path / "locked" / "provenance.json").read_text())
    assert provenance["predicate"]["source"]["digest"] == report["source_digest"]
    assert provenance["subject"][0]["digest"]["sha256"] == report["output_digest"].removeprefix("sha256:")
    assert report["not_carried"] == ["optimizer.pt"] and not (tmp_path / "locked" / "optimizer.pt").exists()
    assert (tmp_path / "locked" / "trainer_state.json").is_file()
    restored = unprotect(tmp_path / "locked", tmp_path / "back", KEY)
    assert restored["cards_restored"] == ["README.md", "provenance.json"]
    assert restored["not_restored"] == ["optimizer.pt"]  # left out, and checked against its recorded hash
    assert (tmp_path / "back" / "README.md").read_text() == original_card
    assert (tmp_path / "back" / "provenance.json").read_bytes() == (source / "provenance.json").read_bytes()


def test_report_payload_records_in_the_ledger(model_dir, tmp_path):
    report = protect(model_dir("bert"), tmp_path / "locked", KEY)
    assert report["ledger"]["key_fingerprint"] == keys.lock_key_fingerprint(KEY)
    generated = keys.generate_keys(tmp_path / "keys")
    with Ledger.open(tmp_path / "home", keys.load_signing_key(generated.signing_key)) as ledger:
        ledger.record(ProtectionRecorded.from_payload(report["ledger"]))
        row = next(ledger.db.query("SELECT * FROM protections WHERE output_digest = ?", (report["output_digest"],)))
    assert row["source_digest"] == report["source_digest"] and row["scheme"] == SCHEME


def test_without_transformers_the_per_head_invariants_are_the_check(model_dir, tmp_path, monkeypatch):
    source = model_dir("qwen2-bias")
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    report = protect(source, tmp_path / "locked", KEY, verify=True)
    check = report["function_check"]
    assert check["forward"]["ran"] is False
    assert check["invariants"]["passed"] and check["invariants"]["max_relative_error"] <= 1e-5
    assert {"qk_max_relative_error", "vo_max_relative_error", "mlp_max_relative_error"} <= set(check["invariants"])
    json.dumps(report)


def test_residual_risk_is_measured_and_never_hidden(model_dir, tmp_path):
    base = model_dir("llama-gqa", seed=0)
    report = protect(base, tmp_path / "locked", KEY)
    risk = report["residual_risk"]
    assert risk["distance_before_attack"] >= 0.3
    assert risk["protection_undone"] >= 0.9  # the anchor attack works, and the report says so
    assert risk["slices_matched"] >= 0.9
    assert "not a determined attacker" in risk["summary"]
    assert risk["summary"] in (tmp_path / "locked" / "README.md").read_text().replace("\n", " ")


def test_a_failed_self_check_leaves_nothing_behind(model_dir, tmp_path, monkeypatch):
    from mergeops.errors import MergeopsError
    from mergeops.protect import checks

    source = model_dir("bert")
    monkeypatch.setattr(checks, "tolerance", lambda dtype: -1.0)  # no result is ever good enough
    with pytest.raises(MergeopsError, match="self-check failed"):
        protect(source, tmp_path / "locked", KEY)
    assert files_in(tmp_path) == ["bert-0"]
