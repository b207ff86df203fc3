"""Key generation and loading on real files: modes, refusals with actionable messages, fingerprints, signatures."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from mergeops import keys
from mergeops.errors import UsageError

pytestmark = pytest.mark.timeout(60)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def write_private_pem(path: Path, key, password: bytes | None = None) -> Path:
    encryption = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption))
    path.chmod(0o600)
    return path


@pytest.fixture
def keydir(tmp_path: Path) -> keys.KeyPaths:
    return keys.generate_keys(tmp_path / "keys")


# -- keygen ---------------------------------------------------------------------------------------

def test_generate_keys_writes_three_files_with_their_modes(keydir: keys.KeyPaths):
    assert keydir.signing_key.name == "signing.pem" and mode(keydir.signing_key) == 0o600
    assert keydir.public_key.name == "signing.pub.pem" and mode(keydir.public_key) == 0o644
    assert keydir.lock_key.name == "lock.key" and mode(keydir.lock_key) == 0o600
    assert keydir.signing_key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, unencrypted
    assert keydir.public_key.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")  # SubjectPublicKeyInfo

    private = keys.load_signing_key(keydir.signing_key)
    public = keys.load_public_key(keydir.public_key)
    assert private.curve.name == "secp256r1"
    assert keys.fingerprint(private.public_key()) == keys.fingerprint(public) == keydir.fingerprint
    lock = keys.load_lock_key(keydir.lock_key)
    assert len(lock) == 32 and keys.lock_key_fingerprint(lock) == keydir.lock_key_id


def test_generate_keys_sets_exact_modes_under_a_strict_umask(tmp_path: Path):
    old = os.umask(0o077)
    try:
        paths = keys.generate_keys(tmp_path / "k")
    finally:
        os.umask(old)
    assert (mode(paths.signing_key), mode(paths.public_key), mode(paths.lock_key)) == (0o600, 0o644, 0o600)


def test_each_generation_is_fresh(tmp_path: Path):
    a, b = keys.generate_keys(tmp_path / "a"), keys.generate_keys(tmp_path / "b")
    assert a.fingerprint != b.fingerprint
    assert a.lock_key.read_bytes() != b.lock_key.read_bytes()


@pytest.mark.parametrize("existing", ["signing.pem", "signing.pub.pem", "lock.key"])
def test_generate_keys_refuses_to_overwrite_and_writes_nothing(tmp_path: Path, existing: str):
    out = tmp_path / "keys"
    out.mkdir()
    (out / existing).write_bytes(b"precious")
    with pytest.raises(UsageError, match=re.escape(str(out / existing))):
        keys.generate_keys(out)
    assert sorted(p.name for p in out.iterdir()) == [existing]
    assert (out / existing).read_bytes() == b"precious"


def test_generate_keys_refuses_a_dangling_symlink(tmp_path: Path):
    out = tmp_path / "keys"
    out.mkdir()
    (out / "signing.pem").symlink_to(tmp_path / "elsewhere.pem")
    with pytest.raises(UsageError, match="already exists"):
        keys.generate_keys(out)
    assert not (tmp_path / "elsewhere.pem").exists()


def test_generate_keys_twice_refuses(keydir: keys.KeyPaths):
    before = keydir.signing_key.read_bytes()
    with pytest.raises(UsageError, match="never overwrites"):
        keys.generate_keys(keydir.signing_key.parent)
    assert keydir.signing_key.read_bytes() == before


# -- loading: refusals ----------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["signing_key", "lock_key"])
@pytest.mark.parametrize("bad_mode", [0o644, 0o640, 0o604, 0o660])
def test_private_file_open_to_others_is_refused_with_the_fix(keydir: keys.KeyPaths, which: str, bad_mode: int):
    path = getattr(keydir, which)
    path.chmod(bad_mode)
    load = keys.load_signing_key if which == "signing_key" else keys.load_lock_key
    with pytest.raises(UsageError) as info:
        load(path)
    assert f"chmod 600 {path}" in str(info.value)
    path.chmod(0o600)
    load(path)  # fixed as told


def test_owner_read_only_private_key_is_accepted(keydir: keys.KeyPaths):
    keydir.signing_key.chmod(0o400)
    keys.load_signing_key(keydir.signing_key)


@pytest.mark.parametrize("load", [keys.load_signing_key, keys.load_lock_key])
def test_missing_private_file_says_run_keygen(tmp_path: Path, load):
    path = tmp_path / "nope"
    with pytest.raises(UsageError) as info:
        load(path)
    assert str(path) in str(info.value) and "mergeops keygen --out DIR" in str(info.value)


def test_missing_public_key_names_the_file(tmp_path: Path):
    with pytest.raises(UsageError, match=re.escape(str(tmp_path / "gone.pub.pem"))):
        keys.load_public_key(tmp_path / "gone.pub.pem")


def test_rsa_signing_key_is_refused(tmp_path: Path):
    path = write_private_pem(tmp_path / "rsa.pem", rsa.generate_private_key(public_exponent=65537, key_size=2048))
    with pytest.raises(UsageError, match=r"is not an EC key \(it is RSA\).*P-256"):
        keys.load_signing_key(path)


def test_signing_key_on_another_curve_is_refused(tmp_path: Path):
    path = write_private_pem(tmp_path / "p384.pem", ec.generate_private_key(ec.SECP384R1()))
    with pytest.raises(UsageError, match=r"secp384r1.*P-256"):
        keys.load_signing_key(path)


def test_encrypted_signing_key_is_refused(tmp_path: Path):
    path = write_private_pem(tmp_path / "enc.pem", ec.generate_private_key(ec.SECP256R1()), password=b"pw")
    with pytest.raises(UsageError, match="password-protected"):
        keys.load_signing_key(path)


def test_non_pem_signing_key_is_refused(keydir: keys.KeyPaths):
    with pytest.raises(UsageError, match="not a PEM private key"):
        keys.load_signing_key(keydir.lock_key)  # 32 random bytes, mode 0600


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_lock_key_of_the_wrong_length_is_refused(tmp_path: Path, size: int):
    path = tmp_path / "lock.key"
    path.write_bytes(b"\x01" * size)
    path.chmod(0o600)
    with pytest.raises(UsageError, match=f"holds {size} bytes.*exactly 32"):
        keys.load_lock_key(path)


def test_private_key_given_as_public_key_is_refused(keydir: keys.KeyPaths):
    with pytest.raises(UsageError, match="holds a private key"):
        keys.load_public_key(keydir.signing_key)


def test_rsa_public_key_is_refused(tmp_path: Path):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    path = tmp_path / "rsa.pub.pem"
    path.write_bytes(key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(UsageError, match="not an EC key"):
        keys.load_public_key(path)


def test_garbage_public_key_is_refused(tmp_path: Path):
    path = tmp_path / "junk.pub.pem"
    path.write_text("hello")
    with pytest.raises(UsageError, match="not a PEM public key"):
        keys.load_public_key(path)


# -- fingerprints ---------------------------------------------------------------------------------

def test_fingerprint_is_stable_and_reveals_no_key_material(keydir: keys.KeyPaths):
    private = keys.load_signing_key(keydir.signing_key)
    public = keys.load_public_key(keydir.public_key)
    fp = keys.fingerprint(public)
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", fp)
    assert fp == keys.fingerprint(keys.load_public_key(keydir.public_key)) == keys.fingerprint(private.public_key())
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    numbers = private.private_numbers()
    for secret in (f"{numbers.private_value:x}", f"{numbers.public_numbers.x:x}", der.hex()[-64:]):
        assert secret not in fp
    pem_body = "".join(keydir.public_key.read_text().splitlines()[1:-1])
    assert pem_body[:16] not in fp


def test_lock_key_fingerprint_identifies_without_revealing(keydir: keys.KeyPaths):
    key = keys.load_lock_key(keydir.lock_key)
    fp = keys.lock_key_fingerprint(key)
    assert re.fullmatch(r"[0-9a-f]{32}", fp)
    assert fp == keys.lock_key_fingerprint(bytes(key))
    assert fp != keys.lock_key_fingerprint(bytes([key[0] ^ 1]) + key[1:])
    assert key.hex()[:8] not in fp and key.hex()[-8:] not in fp


# -- sign / verify bytes --------------------------------------------------------------------------

def test_sign_and_verify_bytes(keydir: keys.KeyPaths, tmp_path: Path):
    private = keys.load_signing_key(keydir.signing_key)
    public = keys.load_public_key(keydir.public_key)
    data = b"ledger event 1"
    signature = keys.sign(private, data)
    assert signature[0] == 0x30  # DER SEQUENCE
    assert keys.verify(public, data, signature)
    assert not keys.verify(public, data + b"!", signature)
    assert not keys.verify(public, data, signature[:-1] + bytes([signature[-1] ^ 1]))
    assert not keys.verify(public, data, b"not a signature")
    other = keys.load_public_key(keys.generate_keys(tmp_path / "other").public_key)
    assert not keys.verify(other, data, signature)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("special", ["FIFO", "/dev/zero"])
def test_a_public_key_that_is_no_regular_file_is_refused_at_once(tmp_path, special):
    path = tmp_path / "signing.pub.pem"
    os.mkfifo(path) if special == "FIFO" else path.symlink_to(special)
    with pytest.raises(UsageError, match=re.escape(f"public key {path} cannot be read: it is a")):
        keys.load_public_key(path)
