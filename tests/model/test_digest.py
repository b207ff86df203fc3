"""The folder digest is exactly the coreutils recipe of SPEC §3.1."""

from __future__ import annotations

import os
import subprocess

import pytest

from mergeops.errors import ModelFolderError
from mergeops.model import folder_digest
from tests.conftest import write_model

COREUTILS_RECIPE = (
    "cd \"$1\" && find -L . -type f ! -path './.git*' ! -path './.cache/*' ! -path ./model.sig "
    "! -path ./README.md ! -path ./provenance.json | sed 's|^\\./||' | LC_ALL=C sort "
    "| xargs -d '\\n' sha256sum | sha256sum | cut -d' ' -f1"
)


def coreutils_digest(path) -> str:
    result = subprocess.run(["bash", "-c", COREUTILS_RECIPE, "_", str(path)], capture_output=True,
                            text=True, check=True)
    return "sha256:" + result.stdout.strip()


def test_digest_equals_coreutils_recipe(tmp_path, tensors):
    model = write_model(tmp_path / "m", tensors, shard_bytes=1500, config={"model_type": "llama"})
    (model / "tokenizer.json").write_text('{"a": 1}')
    (model / "sub").mkdir()
    (model / "sub" / "Zeta.txt").write_text("z")
    (model / "sub" / "alpha.txt").write_text("a")
    (model / "é-unicode.txt").write_text("u")
    assert folder_digest(model) == coreutils_digest(model)


def test_digest_ignores_card_signature_provenance_git_and_cache(tmp_path, tensors):
    model = write_model(tmp_path / "m", tensors)
    before = folder_digest(model)
    for name in ("README.md", "model.sig", "provenance.json", ".gitattributes"):
        (model / name).write_text("anything")
    (model / ".cache" / "huggingface").mkdir(parents=True)
    (model / ".cache" / "huggingface" / "x").write_text("y")
    assert folder_digest(model) == before == coreutils_digest(model)


def test_digest_changes_with_any_byte_of_any_covered_file(tmp_path, tensors):
    model = write_model(tmp_path / "m", tensors, config={"a": 1})
    before = folder_digest(model)
    with open(model / "model.safetensors", "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    assert folder_digest(model) != before


def test_symlink_leaving_the_folder_is_refused(tmp_path, tensors):
    model = write_model(tmp_path / "m", tensors)
    (tmp_path / "outside.json").write_text("{}")
    (model / "config.json").symlink_to(tmp_path / "outside.json")
    with pytest.raises(ModelFolderError, match="outside the model folder"):
        folder_digest(model)


@pytest.mark.timeout(20)
def test_a_symlink_loop_is_refused_instead_of_walked_forever(tmp_path, tensors):
    model = write_model(tmp_path / "m", tensors)
    (model / "sub").mkdir()
    (model / "sub" / "up").symlink_to("..")
    with pytest.raises(ModelFolderError, match="symlink loop"):
        folder_digest(model)
    (model / "sub" / "up").unlink()
    (model / "sub" / "here").symlink_to(".")
    with pytest.raises(ModelFolderError, match=r"sub/here in .* is a symlink loop"):
        folder_digest(model)


def test_symlink_inside_the_folder_is_followed(tmp_path, tensors):
    model = write_model(tmp_path / "m", tensors)
    (model / "real.json").write_text("{}")
    (model / "link.json").symlink_to("real.json")
    assert folder_digest(model) == coreutils_digest(model)


def test_background_digest_equals_the_folder_digest(tmp_path, tensors):
    from mergeops.model.digest import BackgroundDigest

    path = write_model(tmp_path / "m", tensors, shard_bytes=1500, config={"a": 1})
    ticks = []
    with BackgroundDigest(path) as pending:
        assert pending.result(tick=lambda: ticks.append(1)) == folder_digest(path) == coreutils_digest(path)


def test_background_digest_reports_a_bad_folder_when_asked(tmp_path, tensors):
    from mergeops.model.digest import BackgroundDigest

    path = write_model(tmp_path / "m", tensors)
    os.symlink("/etc/hostname", path / "outside")
    with BackgroundDigest(path) as pending, pytest.raises(ModelFolderError, match="outside the model folder"):
        pending.result()


def test_leaving_a_background_digest_early_stops_it(tmp_path):
    import time

    from mergeops.model.digest import BackgroundDigest

    (tmp_path / "m").mkdir()
    with open(tmp_path / "m" / "big.bin", "wb") as f:
        f.truncate(8 << 30)  # sparse 8 GiB of zeros: several seconds to hash, no disk used
    start = time.perf_counter()
    with BackgroundDigest(tmp_path / "m"):
        time.sleep(0.05)
    assert time.perf_counter() - start < 1.0  # stops within one 8 MiB chunk, not after the whole file
