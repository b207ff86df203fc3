"""Keys: the EC P-256 signing key pair (ledger events, published models) and the MergeLock secret.

``mergeops keygen --out DIR`` writes three files (SPEC §3.2):

- ``signing.pem``: EC P-256 private key, PEM PKCS#8, unencrypted, mode 0600;
- ``signing.pub.pem``: its public key, PEM SubjectPublicKeyInfo, mode 0644 (give this one away);
- ``lock.key``: 32 random bytes, the MergeLock secret, mode 0600.

Keys are never printed. A public key is shown as its :func:`fingerprint`
(``sha256:`` + hex sha256 of the DER SubjectPublicKeyInfo); the lock key as :func:`lock_key_fingerprint`
(an HMAC of a fixed label under the key, which identifies the key without revealing it).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mergeops import untrusted
from mergeops.durable import fsync_dir
from mergeops.errors import PolicyError, UntrustedFileError, UsageError

SIGNING_KEY_FILE = "signing.pem"
PUBLIC_KEY_FILE = "signing.pub.pem"
LOCK_KEY_FILE = "lock.key"
LOCK_KEY_BYTES = 32
MAX_KEY_FILE_BYTES = 64 << 10  # a PEM key is a few hundred bytes

PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644

# Curves a *trusted* public key may use: the ones OpenSSF model signing verifies. Our own keys are P-256.
PUBLIC_KEY_CURVES = ("secp256r1", "secp384r1", "secp521r1")

_LOCK_KEY_ID_LABEL = b"mergeops lock key id"


@dataclass(frozen=True)
class KeyPaths:
    """The files written by :func:`generate_keys`, and how to refer to the keys without showing them."""

    signing_key: Path
    public_key: Path
    lock_key: Path
    fingerprint: str  # of the public key, "sha256:<hex>"
    lock_key_id: str  # lock_key_fingerprint(lock key)


# -- generating -----------------------------------------------------------------------------------

def generate_keys(out_dir: Path) -> KeyPaths:
    """Write a fresh signing key pair and lock key into ``out_dir`` (created if missing).

    Refuses (UsageError, nothing written) if any of the three files already exists. Each file is
    created with ``O_CREAT|O_EXCL`` and its final mode before the first byte is written, then fsynced.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{out_dir} exists and is not a directory; choose another --out DIR.")
    paths = (out_dir / SIGNING_KEY_FILE, out_dir / PUBLIC_KEY_FILE, out_dir / LOCK_KEY_FILE)
    for path in paths:
        if os.path.lexists(path):
            raise UsageError(f"{path} already exists; keygen never overwrites keys, so choose an empty --out DIR "
                             "or move the old keys away first.")

    private_key = ec.generate_private_key(ec.SECP256R1())
    private_pem = private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption())
    public_pem = private_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo)
    lock_key = secrets.token_bytes(LOCK_KEY_BYTES)

    out_dir.mkdir(parents=True, exist_ok=True)
    created: list[Path] = []
    try:
        for path, data, mode in zip(paths, (private_pem, public_pem, lock_key),
                                    (PRIVATE_MODE, PUBLIC_MODE, PRIVATE_MODE), strict=True):
            _create_exclusive(path, data, mode)
            created.append(path)
        fsync_dir(out_dir)
    except BaseException:
        for path in created:
            with contextlib.suppress(OSError):
                path.unlink()
        raise
    return KeyPaths(signing_key=paths[0], public_key=paths[1], lock_key=paths[2],
                    fingerprint=fingerprint(private_key.public_key()), lock_key_id=lock_key_fingerprint(lock_key))


def _create_exclusive(path: Path, data: bytes, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode)
    except FileExistsError:
        raise UsageError(f"{path} already exists; keygen never overwrites keys, so choose an empty --out DIR "
                         "or move the old keys away first.") from None
    try:
        os.fchmod(fd, mode)  # the umask may have removed bits we want (0644 under umask 077)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


# -- loading --------------------------------------------------------------------------------------

def _read_private_file(path: Path, what: str) -> bytes:
    """Read a secret file, refusing it when missing, not a regular file, or open to group/others."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UsageError(f"{what} {path} does not exist; create keys with `mergeops keygen --out DIR` "
                         "and point the policy's [keys] at them.") from None
    except OSError as exc:
        raise UsageError(f"{what} {path} cannot be read ({exc.strerror}).") from None
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{what} {path} is not a regular file; point the policy's [keys] at the key file itself.")
    if st.st_mode & 0o077:
        raise UsageError(f"{what} {path} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                         f"run `chmod 600 {path}` and try again.")
    try:  # through the door: a FIFO put there since the check above is refused, not waited on
        return untrusted.read_bytes(path, max_bytes=MAX_KEY_FILE_BYTES)
    except UntrustedFileError as exc:
        raise UsageError(f"{what} {path} cannot be read: it {exc.reason}.") from None


def load_signing_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Load the EC P-256 private signing key (unencrypted PEM, mode 0600)."""
    data = _read_private_file(path, "signing key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # encrypted key and no password
        raise UsageError(f"signing key {path} is password-protected; mergeops needs an unencrypted key protected by "
                         "file mode 0600 (create one with `mergeops keygen --out DIR`).") from None
    except (ValueError, UnsupportedAlgorithm):
        raise UsageError(f"signing key {path} is not a PEM private key; create one with "
                         "`mergeops keygen --out DIR`.") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise UsageError(f"signing key {path} is not an EC key (it is {_key_kind(key)}), but mergeops signs with "
                         "EC P-256 keys; create one with `mergeops keygen --out DIR`.")
    if key.curve.name != "secp256r1":
        raise UsageError(f"signing key {path} uses curve {key.curve.name}, but mergeops signs with EC P-256 "
                         "(secp256r1) keys; create one with `mergeops keygen --out DIR`.")
    return key


def load_lock_key(path: Path) -> bytes:
    """Load the 32-byte MergeLock secret (mode 0600)."""
    data = _read_private_file(path, "lock key")
    if len(data) != LOCK_KEY_BYTES:
        raise UsageError(f"lock key {path} holds {len(data)} bytes, but a MergeLock key is exactly "
                         f"{LOCK_KEY_BYTES} random bytes; create one with `mergeops keygen --out DIR`.")
    return data


def load_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """Load an EC public key (PEM SubjectPublicKeyInfo) on P-256, P-384 or P-521.

    P-384/P-521 are accepted because a trusted producer's model signatures may use them; our own keys are P-256.
    """
    path = Path(path)
    if not os.path.lexists(path):
        raise UsageError(f"public key {path} does not exist; give the path of a signing.pub.pem written by "
                         "`mergeops keygen --out DIR`.")
    try:
        data = untrusted.read_bytes(path, max_bytes=MAX_KEY_FILE_BYTES)
    except UntrustedFileError as exc:
        raise UsageError(f"public key {path} cannot be read: it {exc.reason}.") from None
    if b"PRIVATE KEY-----" in data:
        raise UsageError(f"{path} holds a private key; give the public key (signing.pub.pem) instead, and keep "
                         "the private key out of shared configuration.")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise UsageError(f"public key {path} is not a PEM public key; give a signing.pub.pem written by "
                         "`mergeops keygen --out DIR`.") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise UsageError(f"public key {path} is not an EC key (it is {_key_kind(key)}); mergeops verifies "
                         "EC P-256, P-384 and P-521 keys.")
    if key.curve.name not in PUBLIC_KEY_CURVES:
        raise UsageError(f"public key {path} uses curve {key.curve.name}; mergeops verifies EC P-256, P-384 "
                         "and P-521 keys only.")
    return key


class SigningKeyConfig(Protocol):
    """What the key helpers need of a policy's ``[keys]`` table (``mergeops.policy.KeysConfig``)."""

    @property
    def signing(self) -> Path | None: ...


def signing_key_path(policy_keys: SigningKeyConfig) -> Path:
    """The policy's signing key file, which signs every ledger event (and published models)."""
    if policy_keys.signing is None:
        raise PolicyError("the policy has no [keys] signing key, which signs every ledger event; create one with "
                          "`mergeops keygen --out keys` and add `[keys]` `signing = \"keys/signing.pem\"`.")
    return policy_keys.signing


def public_key_file(private: Path) -> Path:
    """Where ``keygen`` puts a private key's public half: ``signing.pub.pem`` beside ``signing.pem``."""
    return private.with_name(private.name.removesuffix(".pem") + ".pub.pem")


def public_key_for(policy_keys: SigningKeyConfig) -> ec.EllipticCurvePublicKey:
    """The policy's public key: ``signing.pub.pem`` beside the private key, else derived from it."""
    private = signing_key_path(policy_keys)
    public = public_key_file(private)
    if public.is_file():
        return load_public_key(public)
    return load_signing_key(private).public_key()


def _key_kind(key: object) -> str:
    name = type(key).__name__  # e.g. RSAPrivateKey, Ed25519PublicKey (or an OpenSSL-backed subclass)
    for suffix in ("PrivateKey", "PublicKey"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name.lstrip("_") or "different"


# -- showing --------------------------------------------------------------------------------------

def fingerprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """``sha256:<hex>`` of the DER SubjectPublicKeyInfo: the only way a key is ever shown."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def lock_key_fingerprint(key: bytes) -> str:
    """A 32-hex-digit identifier of a lock key (HMAC-SHA256 of a fixed label, truncated); never the key."""
    return hmac.new(key, _LOCK_KEY_ID_LABEL, hashlib.sha256).digest()[:16].hex()


# -- signing --------------------------------------------------------------------------------------

def sign(private_key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """ECDSA P-256 / SHA-256 signature of ``data``, DER encoded."""
    return private_key.sign(data, ec.ECDSA(hashes.SHA256()))


def verify(public_key: ec.EllipticCurvePublicKey, data: bytes, signature: bytes) -> bool:
    """True when ``signature`` (DER ECDSA/SHA-256) is valid for ``data`` under ``public_key``."""
    try:
        public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True
