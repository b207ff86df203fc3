"""OpenSSF model signing of real model folders, checked with our verifier and with the model_signing CLI."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergeops import keys
from mergeops.errors import ModelFolderError, UsageError
from mergeops.model.signing import SIGNATURE_FILE, sign_model_folder, verify_model_folder

pytestmark = pytest.mark.timeout(120)


def model_signing_cli() -> list[str]:
    beside = Path(sys.executable).with_name("model_signing")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("model_signing") or shutil.which("model-signing")
    return [found] if found else [sys.executable, "-m", "model_signing"]


def cli_verify(folder: Path, public_key: Path) -> subprocess.CompletedProcess[str]:
    """Exactly the command SPEC §3.4 promises to the world."""
    command = [*model_signing_cli(), "verify", "key", str(folder), "--public_key", str(public_key),
               "--signature", str(folder / "model.sig")]
    return subprocess.run(command, capture_output=True, text=True, timeout=90)


@pytest.fixture
def key_paths(tmp_path: Path) -> keys.KeyPaths:
    return keys.generate_keys(tmp_path / "keys")


@pytest.fixture
def model(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file({"layer.weight": torch.randn(8, 4, generator=g), "layer.bias": torch.randn(8, generator=g)},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"architectures": ["Tiny"], "hidden_size": 4}))
    (folder / "README.md").write_text("---\nbase_model: base\n---\n# tiny\n")
    (folder / "provenance.json").write_text("{}")
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    return folder


def flip_byte(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_signed_folder_verifies_with_us_and_with_the_cli(model: Path, key_paths: keys.KeyPaths):
    signature = sign_model_folder(model, key_paths.signing_key)
    assert signature == model.resolve() / SIGNATURE_FILE and signature.is_file()
    bundle = json.loads(signature.read_text())
    assert bundle["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
    assert verify_model_folder(model, [key_paths.public_key]) == key_paths.fingerprint
    result = cli_verify(model, key_paths.public_key)
    assert result.returncode == 0, result.stderr


def test_one_flipped_byte_fails_both_verifiers(model: Path, key_paths: keys.KeyPaths):
    sign_model_folder(model, key_paths.signing_key)
    flip_byte(model / "model.safetensors")
    assert verify_model_folder(model, [key_paths.public_key]) is None
    result = cli_verify(model, key_paths.public_key)
    assert result.returncode != 0
    assert "model.safetensors" in result.stderr


@pytest.mark.parametrize("name", ["README.md", "provenance.json", "tokenizer/vocab.txt"])
def test_every_other_file_is_covered(model: Path, key_paths: keys.KeyPaths, name: str):
    sign_model_folder(model, key_paths.signing_key)
    flip_byte(model / name, 0)
    assert verify_model_folder(model, [key_paths.public_key]) is None
    assert cli_verify(model, key_paths.public_key).returncode != 0


def test_added_or_removed_file_fails(model: Path, key_paths: keys.KeyPaths):
    sign_model_folder(model, key_paths.signing_key)
    (model / "extra.json").write_text("{}")
    assert verify_model_folder(model, [key_paths.public_key]) is None
    (model / "extra.json").unlink()
    assert verify_model_folder(model, [key_paths.public_key]) == key_paths.fingerprint
    (model / "config.json").unlink()
    assert verify_model_folder(model, [key_paths.public_key]) is None


def test_a_different_key_does_not_verify(model: Path, key_paths: keys.KeyPaths, tmp_path: Path):
    sign_model_folder(model, key_paths.signing_key)
    other = keys.generate_keys(tmp_path / "other")
    assert verify_model_folder(model, [other.public_key]) is None
    assert verify_model_folder(model, []) is None
    assert cli_verify(model, other.public_key).returncode != 0


def test_the_first_trusted_key_that_verifies_is_reported(model: Path, key_paths: keys.KeyPaths, tmp_path: Path):
    sign_model_folder(model, key_paths.signing_key)
    other = keys.generate_keys(tmp_path / "other")
    assert verify_model_folder(model, [other.public_key, key_paths.public_key]) == key_paths.fingerprint


def test_resigning_replaces_the_signature_and_still_verifies(model: Path, key_paths: keys.KeyPaths, tmp_path: Path):
    sign_model_folder(model, key_paths.signing_key)
    other = keys.generate_keys(tmp_path / "other")
    sign_model_folder(model, other.signing_key)  # the old model.sig must not be part of what is signed
    assert verify_model_folder(model, [key_paths.public_key]) is None
    assert verify_model_folder(model, [other.public_key]) == other.fingerprint
    assert cli_verify(model, other.public_key).returncode == 0
    assert sorted(p.name for p in model.parent.iterdir()) == ["keys", "model", "other"]  # no staging left over


def test_hugging_face_cache_metadata_is_not_signed(model: Path, key_paths: keys.KeyPaths):
    sign_model_folder(model, key_paths.signing_key)
    (model / ".cache" / "huggingface").mkdir(parents=True)
    (model / ".cache" / "huggingface" / "download.lock").write_text("x")
    assert verify_model_folder(model, [key_paths.public_key]) == key_paths.fingerprint
    assert cli_verify(model, key_paths.public_key).returncode == 0


def test_malformed_signature_is_not_valid(model: Path, key_paths: keys.KeyPaths):
    (model / SIGNATURE_FILE).write_text("not json")
    assert verify_model_folder(model, [key_paths.public_key]) is None
    sign_model_folder(model, key_paths.signing_key)
    bundle = json.loads((model / SIGNATURE_FILE).read_text())
    bundle["dsseEnvelope"]["signatures"][0]["sig"] = "AAAA"
    (model / SIGNATURE_FILE).write_text(json.dumps(bundle))
    assert verify_model_folder(model, [key_paths.public_key]) is None


def test_missing_signature_is_a_model_folder_error(model: Path, key_paths: keys.KeyPaths, tmp_path: Path):
    with pytest.raises(ModelFolderError, match=r"has no model\.sig"):
        verify_model_folder(model, [key_paths.public_key])
    with pytest.raises(ModelFolderError, match="does not exist"):
        verify_model_folder(tmp_path / "absent", [key_paths.public_key])


def test_missing_trusted_key_file_is_a_usage_error(model: Path, key_paths: keys.KeyPaths, tmp_path: Path):
    sign_model_folder(model, key_paths.signing_key)
    with pytest.raises(UsageError, match=r"gone\.pub\.pem"):
        verify_model_folder(model, [tmp_path / "gone.pub.pem"])


def test_signing_refuses_a_private_key_open_to_others(model: Path, key_paths: keys.KeyPaths):
    key_paths.signing_key.chmod(0o644)
    with pytest.raises(UsageError, match=re.escape(f"chmod 600 {key_paths.signing_key}")):
        sign_model_folder(model, key_paths.signing_key)
    assert not (model / SIGNATURE_FILE).exists()


def test_symlinks_inside_the_folder_are_refused(model: Path, key_paths: keys.KeyPaths, tmp_path: Path):
    (tmp_path / "outside.json").write_text("{}")
    (model / "linked.json").symlink_to(tmp_path / "outside.json")
    with pytest.raises(ModelFolderError, match="symlink"):
        sign_model_folder(model, key_paths.signing_key)
    assert not (model / SIGNATURE_FILE).exists()


def test_a_symlink_to_the_folder_itself_is_followed(model: Path, key_paths: keys.KeyPaths, tmp_path: Path):
    latest = tmp_path / "latest"
    latest.symlink_to(model)
    sign_model_folder(latest, key_paths.signing_key)
    assert verify_model_folder(latest, [key_paths.public_key]) == key_paths.fingerprint
    assert cli_verify(model, key_paths.public_key).returncode == 0


def test_verification_keeps_stdout_clean(model: Path, key_paths: keys.KeyPaths, capfd: pytest.CaptureFixture[str]):
    sign_model_folder(model, key_paths.signing_key)
    bundle = json.loads((model / SIGNATURE_FILE).read_text())
    del bundle["verificationMaterial"]["publicKey"]["hint"]  # old format: model_signing prints a warning
    (model / SIGNATURE_FILE).write_text(json.dumps(bundle))
    assert verify_model_folder(model, [key_paths.public_key]) == key_paths.fingerprint
    assert capfd.readouterr().out == ""
