"""OpenSSF model signing of a model folder: ``model.sig`` (SPEC §3.4) and the ``require_signature`` gate (§6).

The signature is a Sigstore bundle (``application/vnd.dev.sigstore.bundle.v0.3+json``) holding a DSSE envelope
over an in-toto statement that lists every file of the folder with its sha256, signed with the EC key in
``signing.pem``. It is made and checked by the ``model_signing`` library exactly as its CLI does, so anyone can
verify a published model without mergeops::

    model_signing verify key DIR --public_key signing.pub.pem --signature DIR/model.sig

What is signed: every regular file in the folder, README.md and provenance.json included, except ``model.sig``
itself, ``.cache/`` (Hugging Face download metadata) and the git files model_signing always skips (``.git/``,
``.github/``, ``.gitattributes``, ``.gitignore``). The skipped paths are recorded in the signed statement, so the
CLI skips them too. Symlinks and special files are refused (model_signing refuses them by default).
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import model_signing.hashing
import model_signing.signing
import model_signing.verifying

from mergeops import keys
from mergeops.durable import fsync_dir, fsync_file
from mergeops.errors import ModelFolderError

SIGNATURE_FILE = "model.sig"
# Paths (relative to the folder) left out of the signature. model_signing adds its git paths itself.
UNSIGNED_PATHS = (SIGNATURE_FILE, ".cache")


def _hashing_config() -> model_signing.hashing.Config:
    """The hashing the model_signing CLI uses (sha256 per file, no symlinks), skipping our unsigned paths."""
    return (model_signing.hashing.Config()
            .use_file_serialization(hashing_algorithm="sha256", allow_symlinks=False)
            .set_ignored_paths(paths=list(UNSIGNED_PATHS), ignore_git_paths=True))


def _model_dir(folder: Path) -> Path:
    """The folder, resolved (so ``output/latest`` works), refused unless it holds only regular files and dirs."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"model folder {folder} does not exist or is not a directory.")
    root = folder.resolve()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in (*dirnames, *filenames):
            path = Path(dirpath, name)
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise ModelFolderError(f"{path} is a symlink; model signatures cover regular files only, so replace "
                                       "it with a copy of its target.")
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise ModelFolderError(f"{path} is not a regular file; remove it from the model folder.")
    return root


def sign_model_folder(folder: Path, private_key_path: Path) -> Path:
    """Sign ``folder`` with the EC private key at ``private_key_path``; write and return ``folder/model.sig``.

    An existing ``model.sig`` is replaced atomically. Raises UsageError for a bad key file and ModelFolderError
    for a folder that cannot be signed.
    """
    keys.load_signing_key(private_key_path)  # mode 0600, EC P-256, unencrypted: refuse early with a clear message
    root = _model_dir(folder)
    target = root / SIGNATURE_FILE
    config = model_signing.signing.Config().use_elliptic_key_signer(private_key=Path(private_key_path))
    config.set_hashing_config(_hashing_config())
    # Write beside the folder (same filesystem, outside what is hashed), then rename into place.
    with tempfile.TemporaryDirectory(prefix=f".{root.name}.sign-", dir=root.parent) as tmp:
        staged = Path(tmp, SIGNATURE_FILE)
        try:
            config.sign(root, staged)
        except (OSError, ValueError) as exc:
            raise ModelFolderError(f"cannot sign model folder {root}: {exc}") from exc
        fsync_file(staged)
        os.chmod(staged, 0o644)
        os.replace(staged, target)
    fsync_dir(root)
    return target


def verify_model_folder(folder: Path, public_key_paths: Sequence[Path]) -> str | None:
    """Fingerprint of the first of ``public_key_paths`` for which ``folder/model.sig`` is valid, else None.

    A bad, foreign or malformed signature, or a folder whose files no longer match it, gives None. Raises
    ModelFolderError when the folder or its ``model.sig`` is missing (or it holds symlinks), and UsageError when
    a public key file is missing or not an EC public key (a configuration mistake, not a bad signature).
    """
    folder = Path(folder)
    if not (folder / SIGNATURE_FILE).is_file():
        if not folder.is_dir():
            raise ModelFolderError(f"model folder {folder} does not exist or is not a directory.")
        raise ModelFolderError(f"model folder {folder} has no {SIGNATURE_FILE}; sign it with "
                               f"`model_signing sign key {folder} --private_key signing.pem --signature "
                               f"{folder / SIGNATURE_FILE}` or turn off require_signature.")
    trusted = [(Path(path), keys.load_public_key(Path(path))) for path in public_key_paths]
    root = _model_dir(folder)
    signature = root / SIGNATURE_FILE
    for path, public_key in trusted:
        config = model_signing.verifying.Config().use_elliptic_key_verifier(public_key=path)
        config.set_hashing_config(_hashing_config())
        try:
            # model_signing prints a warning for old-format bundles; keep stdout clean for --json output.
            with contextlib.redirect_stdout(sys.stderr):
                config.verify(root, signature)
        except Exception:  # any failure (bad signature, wrong key, changed files, malformed bundle) is "not valid"
            continue
        return keys.fingerprint(public_key)
    return None
