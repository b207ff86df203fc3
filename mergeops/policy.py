"""The policy file (SPEC §3.3): what to watch, how to merge, where to write, what to check.

Parsing is strict: an unknown key is an error that suggests the closest valid one, a value of the
wrong type names its key, and every relative path is resolved against the policy file's folder. The policy is
checked as a whole too: stream names are safe folder names, every value is of a sane size, and the folders mergeops
writes (outputs, publish targets, the home) stay apart from each other, from the registries it watches and from the
bases, so no stream folds its own output or prunes a folder it reads.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergeops.errors import PolicyError, UntrustedFileError, shown
from mergeops.hub_uri import HubUri, is_hub
from mergeops.untrusted import MiB, parse_toml, read_bytes

OUTPUT_DTYPES = ("base", "float32", "bfloat16", "float16")
MAX_ADAPTER_RANK = 4096  # a LoRA rank above this is no longer an adapter (ranks are capped per tensor anyway)
# What to do with a checkpoint whose vocabulary differs from the base's (tokens added, ids moved): reject it, or fold
# the rows of the base's tokens, matched by token string, and drop the rest.
VOCAB_SETTINGS = ("reject", "base")
# A stream's name becomes a folder name (home/streams/NAME, the default output merged/NAME): no separator, no "..".
STREAM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# A Hub repository id as the Hub accepts it: org/name, each 1-96 characters, neither starting nor ending with . or -.
HUB_REPO = re.compile(r"(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])/"
                      r"(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])")
MAX_POLICY_BYTES = 1 * MiB
MAX_KEY_CHARS = 128  # a key names a stream, a setting, a parameter or a metric: a short name
MAX_TEXT_CHARS = 16384  # any string value (an eval command is the longest)
MAX_INTEGER = 2**53  # every count in a policy is far smaller; larger ones overflow SQLite and JSON readers
MAX_PATH_BYTES, MAX_NAME_BYTES = 4095, 255  # Linux's PATH_MAX and NAME_MAX (beyond them, every os call fails)
MAX_KEEP = 100_000
MAX_STREAMS = 1000  # the daemon folds one arrival at a time: more streams than this is a policy gone wrong
MAX_SECONDS = 7 * 24 * 3600.0  # poll_seconds, settle_seconds, eval_timeout


@dataclass(frozen=True)
class WatchConfig:
    path: Path | None = None
    hub: str | None = None
    revision: str = "main"
    poll_seconds: float = 300.0
    settle_seconds: float = 5.0
    marker: str | None = None  # a file whose presence says a checkpoint is complete (COMMITTED, trainer_state.json)


@dataclass(frozen=True)
class GateConfig:
    max_update_ratio: float | None = None
    # ‖τ‖/‖θ0‖ bound for a stream's first update (no accepted norms yet). Measured (floating tensors): real fine-tunes
    # 0.0013-0.077 (MiniLM, 4 to 200 AdamW steps, lr up to 1e-3: ten times the quality benchmark's 0.028), the
    # demo's 0.015, the tests' synthetic checkpoints 0.15-0.48; MergeLock-protected copies with marks stripped 1.0
    # (strength 0, signed permutations only) to 22-29 (strength 6), on MiniLM and on a Llama.
    max_base_relative_update: float = 0.5
    licenses: tuple[str, ...] | None = None
    require_signature: bool = False
    trusted_keys: tuple[Path, ...] = ()
    eval: str | None = None
    min: dict[str, float] = field(default_factory=dict)
    allow_protected: bool = False  # fold MergeLock-protected checkpoints anyway (they break the merge by design)
    eval_timeout: float = 3600.0  # seconds the eval command may run
    eval_env: tuple[str, ...] = ()  # secret environment variables the eval command may see (e.g. HF_TOKEN)


@dataclass(frozen=True)
class PublishConfig:
    to: Path | None = None
    hub: str | None = None
    protect: bool = False
    sign: bool = True
    as_adapter: int | None = None  # publish a LoRA adapter of this rank against the base instead of the model


@dataclass(frozen=True)
class StreamConfig:
    name: str
    base: Path | str  # a local folder, or "hf://org/repo@revision"
    method: str
    output: Path
    keep: int = 5
    dtype: str = "base"
    vocab: str = "reject"  # one of VOCAB_SETTINGS
    params: dict[str, Any] = field(default_factory=dict)
    watch: tuple[WatchConfig, ...] = ()
    gate: GateConfig = field(default_factory=GateConfig)
    publish: PublishConfig | None = None


@dataclass(frozen=True)
class KeysConfig:
    signing: Path | None = None
    lock: Path | None = None
    signer: str | None = None  # the signing key's fingerprint, pinned: audit refuses a ledger signed by another key


@dataclass(frozen=True)
class Policy:
    path: Path
    digest: str  # sha256 of the policy file's bytes, recorded with every version
    home: Path
    keys: KeysConfig
    streams: dict[str, StreamConfig]

    def stream(self, name: str | None) -> StreamConfig:
        """The named stream, or the only one when ``name`` is None."""
        if name is None:
            if len(self.streams) != 1:
                raise PolicyError(f"{self.path} defines {len(self.streams)} streams "
                                  f"({', '.join(self.streams)}); choose one with --stream.")
            return next(iter(self.streams.values()))
        if name not in self.streams:
            raise PolicyError(f"{self.path} has no stream {shown(name)}{_suggest(name, self.streams)}.")
        return self.streams[name]


def _suggest(key: str, valid: Any) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _Table:
    """One TOML table being read: takes keys with types, then complains about any left over."""

    def __init__(self, data: Any, where: str, policy: Path) -> None:
        if not isinstance(data, dict):
            raise PolicyError(f"{policy}: {where} must be a table.")
        self.data, self.where, self.policy = dict(data), where, policy
        self.known: list[str] = []

    def take(self, key: str, kind: type | tuple[type, ...], default: Any = None, required: bool = False) -> Any:
        self.known.append(key)
        if key not in self.data:
            if required:
                raise PolicyError(f"{self.policy}: {self.where} needs a {key!r} key.")
            return default
        value = self.data.pop(key)
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise PolicyError(f"{self.policy}: {self.where}.{key} must be a {names}, not {shown(value)}.")
        if isinstance(value, float) and not math.isfinite(value):
            raise PolicyError(f"{self.policy}: {self.where}.{key} must be a finite number, not {value!r}.")
        return value

    def strings(self, key: str) -> tuple[str, ...] | None:
        """A list of strings (licenses, key files, variable names), or None when the key is not there."""
        values = self.take(key, list)
        if values is not None and not all(isinstance(v, str) for v in values):
            raise PolicyError(f"{self.policy}: {self.where}.{key} must be a list of strings, not {shown(values)}.")
        return tuple(values) if values is not None else None

    def done(self) -> None:
        for key in self.data:
            raise PolicyError(f"{self.policy}: unknown key {shown(key)} in {self.where}"
                              f"{_suggest(key, self.known)}.")


def _check_sizes(document: Any, path: Path) -> None:
    """Every key, string and integer in the policy is of a sane size (walked without recursion: the document is
    untrusted). Finer ranges are checked where each value is read."""
    stack = [document]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            for key in value:
                if len(key) > MAX_KEY_CHARS:
                    raise PolicyError(f"{path}: the key {shown(key)} is {len(key)} characters long; keys are names "
                                      f"of at most {MAX_KEY_CHARS}.")
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, str) and len(value) > MAX_TEXT_CHARS:
            raise PolicyError(f"{path}: the value {shown(value)} is {len(value)} characters long; no setting needs "
                              f"more than {MAX_TEXT_CHARS}.")
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INTEGER:
            raise PolicyError(f"{path}: the integer {shown(value)} is too large for any setting (at most "
                              f"{MAX_INTEGER}).")


def _path_text(value: str, path: Path) -> str:
    """``value`` checked as a path the operating system accepts (else every call on it would fail deep inside)."""
    encoded = os.fsencode(value)
    if not value or len(encoded) > MAX_PATH_BYTES or any(len(part) > MAX_NAME_BYTES for part in encoded.split(b"/")):
        raise PolicyError(f"{path}: the path {shown(value)} is empty or too long (at most {MAX_PATH_BYTES} bytes, "
                          f"{MAX_NAME_BYTES} per folder or file name); give a shorter one.")
    return value


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Read and check a policy file; raises :class:`PolicyError` naming the key or file at fault."""
    path = Path(path)
    try:
        raw = read_bytes(path, max_bytes=MAX_POLICY_BYTES)
    except UntrustedFileError as exc:
        raise PolicyError(f"cannot read policy file {path} ({exc.reason}); pass an existing TOML file "
                          "with --policy.") from exc
    try:
        data = parse_toml(raw, path, finite=False)  # nan and inf are refused below, naming their key
    except UntrustedFileError as exc:
        raise PolicyError(f"{path} {exc.reason}; correct the policy file.") from exc
    _check_sizes(data, path)
    folder = path.resolve().parent

    def local(value: str) -> Path:
        try:
            return (folder / _path_text(value, path)).resolve()
        except (OSError, RuntimeError) as exc:  # a symlink loop, a folder that cannot be read
            raise PolicyError(f"{path}: the path {shown(value)} cannot be resolved ({exc}); fix it.") from exc

    top = _Table(data, "the top level", path)
    home_value = os.environ.get("MERGEOPS_HOME") or top.take("home", str, "state")
    if "MERGEOPS_HOME" in os.environ:
        top.take("home", str)
    keys_table = _Table(top.take("keys", dict, {}), "[keys]", path)
    signing, lock = keys_table.take("signing", str), keys_table.take("lock", str)
    signer = keys_table.take("signer", str)
    keys_table.done()
    if signer is not None and not re.fullmatch(r"sha256:[0-9a-f]{64}", signer):
        raise PolicyError(f"{path}: [keys] signer must be a key fingerprint 'sha256:<64 hex digits>' (as `mergeops "
                          f"keygen` prints it), not {shown(signer)}.")
    streams_data = top.take("streams", dict, required=True)
    top.done()
    if not streams_data:
        raise PolicyError(f"{path} defines no streams; add a [streams.NAME] table.")
    if len(streams_data) > MAX_STREAMS:
        raise PolicyError(f"{path} defines {len(streams_data)} streams, more than the {MAX_STREAMS} one daemon can "
                          "serve; split it into several policies with homes of their own.")
    for name in streams_data:
        if not STREAM_NAME.fullmatch(name) or ".." in name:
            raise PolicyError(f"{path}: the stream name {shown(name)} is not a safe name; name a stream with 1-64 "
                              "letters, digits, '_', '.' and '-' (no '..'), starting with a letter or digit.")
    streams = {name: _stream(name, table, path, local) for name, table in streams_data.items()}
    home = local(home_value)
    _check_folders_apart(streams, home, path)
    return Policy(path=path.resolve(), digest="sha256:" + hashlib.sha256(raw).hexdigest(), home=home,
                  keys=KeysConfig(local(signing) if signing else None, local(lock) if lock else None, signer),
                  streams=streams)


# Which kinds of folder must not be one another or lie inside one another, and why. "owned": a folder mergeops
# writes and prunes (an output, a publish target); "watched": a local registry; "base": a local base model.
_APART = {
    ("owned", "owned"): "their versions would overwrite and prune each other",
    ("owned", "watched"): "the stream would fold the versions it writes as new checkpoints, without end",
    ("owned", "base"): "writing and pruning versions would change or delete the base",
    ("owned", "home"): "versions and the ledger's state would be taken for each other",
    ("watched", "home"): "the registry would take the home's folders for checkpoints",
}


def _check_folders_apart(streams: dict[str, StreamConfig], home: Path, path: Path) -> None:
    """The folders a policy writes (outputs, publish targets, the home) are apart from each other, from the registries
    it watches and from the local bases: none is another, and none lies inside another. Paths are compared resolved,
    so a symlinked folder counts where it leads."""
    folders: list[tuple[str, str, Path]] = [("home", "the home", home)]
    for name, s in streams.items():
        folders.append(("owned", f"[streams.{name}].output", s.output))
        if s.publish is not None and s.publish.to is not None:
            folders.append(("owned", f"[streams.{name}.publish].to", s.publish.to))
        if isinstance(s.base, Path):
            folders.append(("base", f"[streams.{name}].base", s.base))
        folders += [("watched", f"[[streams.{name}.watch]].path", w.path) for w in s.watch if w.path is not None]
    # Each folder is looked up along its own path (itself and its parents), not compared with every other, and two
    # entries per folder and kind are enough to find any pair: a policy of thousands of streams is checked in linear
    # time.
    at: dict[Path, list[int]] = {}
    for i, (kind, _, folder) in enumerate(folders):
        if sum(folders[j][0] == kind for j in at.get(folder, ())) < 2:
            at.setdefault(folder, []).append(i)
    for i, (kind, what, folder) in enumerate(folders):
        for j in (j for holder in (folder, *folder.parents) for j in at.get(holder, ()) if j != i):
            other_kind, other, other_folder = folders[j]
            reason = _APART.get((kind, other_kind)) or _APART.get((other_kind, kind))
            if reason is not None:
                raise PolicyError(f"{path}: {what} ({folder}) and {other} ({other_folder}) overlap (one is or holds "
                                  f"the other), so {reason}; give each a folder of its own.")
    _check_hubs_apart(streams, path)


def _check_hubs_apart(streams: dict[str, StreamConfig], path: Path) -> None:
    """A Hub repository a stream publishes to is no repository any stream watches: each publication would arrive as
    a new checkpoint, without end."""
    published = {s.publish.hub.lower(): name for name, s in streams.items() if s.publish and s.publish.hub}
    for name, s in streams.items():
        for w in s.watch:
            if w.hub is not None and w.hub.lower() in published:
                raise PolicyError(f"{path}: [[streams.{name}.watch]].hub {w.hub} is the repository "
                                  f"[streams.{published[w.hub.lower()]}.publish].hub publishes to, so every "
                                  "publication would be folded again, without end; watch another repository.")


def _stream(name: str, data: Any, path: Path, local: Any) -> StreamConfig:
    from mergeops.fold.methods import method_class  # the methods validate their own parameters

    where = f"[streams.{name}]"
    table = _Table(data, where, path)
    base = table.take("base", str, required=True)
    method = table.take("method", str, required=True)
    output = table.take("output", str, f"merged/{name}")
    keep = table.take("keep", int, 5)
    dtype = table.take("dtype", str, "base")
    vocab = table.take("vocab", str, "reject")
    params = table.take("params", dict, {})
    watch = table.take("watch", list, [])
    gate = table.take("gate", dict, {})
    publish = table.take("publish", dict)
    table.done()
    if not 1 <= keep <= MAX_KEEP:
        raise PolicyError(f"{path}: {where}.keep must be between 1 and {MAX_KEEP} versions, not {keep}.")
    if dtype not in OUTPUT_DTYPES:
        raise PolicyError(f"{path}: {where}.dtype must be one of {', '.join(OUTPUT_DTYPES)}, not {shown(dtype)}.")
    if vocab not in VOCAB_SETTINGS:
        raise PolicyError(f"{path}: {where}.vocab must be one of {', '.join(VOCAB_SETTINGS)}, not {shown(vocab)}.")
    params = method_class(method, f"{path}: {where}.method").check_params(params, f"{path}: [streams.{name}.params]")
    return StreamConfig(
        name=name, base=_hub_uri(base, f"{where}.base", path) if is_hub(base) else local(base), method=method,
        output=local(output),
        keep=keep, dtype=dtype, vocab=vocab, params=params,
        watch=tuple(_watch(w, f"[[streams.{name}.watch]]", path, local) for w in watch),
        gate=_gate(gate, f"[streams.{name}.gate]", path, local),
        publish=_publish(publish, f"[streams.{name}.publish]", path, local) if publish is not None else None,
    )


def _watch(data: Any, where: str, path: Path, local: Any) -> WatchConfig:
    table = _Table(data, where, path)
    folder, hub = table.take("path", str), table.take("hub", str)
    config = WatchConfig(path=local(folder) if folder is not None else None,
                         hub=_hub_repo(hub, f"{where}.hub", path) if hub is not None else None,
                         revision=table.take("revision", str, "main"),
                         poll_seconds=_seconds(table.take("poll_seconds", float, 300.0), 1.0, f"{where}.poll_seconds",
                                               path),
                         settle_seconds=_seconds(table.take("settle_seconds", float, 5.0), 0.0,
                                                 f"{where}.settle_seconds", path),
                         marker=table.take("marker", str))
    table.done()
    if (folder is None) == (hub is None):
        raise PolicyError(f"{path}: each {where} needs exactly one of 'path' (a local folder) or 'hub' (org/repo).")
    if config.marker is not None and (config.marker in ("", ".", "..") or "/" in config.marker):
        raise PolicyError(f"{path}: {where}.marker must be a file name in each checkpoint's folder (such as "
                          f"'COMMITTED'), not {shown(config.marker)}.")
    if not config.revision or len(config.revision) > MAX_NAME_BYTES or not config.revision.isprintable():
        raise PolicyError(f"{path}: {where}.revision must be a branch, tag or commit id, not "
                          f"{shown(config.revision)}.")
    return config


def _seconds(value: float, least: float, where: str, path: Path) -> float:
    if not least <= value <= MAX_SECONDS:  # NaN fails this too
        raise PolicyError(f"{path}: {where} must be between {least:g} and {MAX_SECONDS:.0f} seconds, not "
                          f"{shown(value)}.")
    return value


def _hub_repo(repo: str, where: str, path: Path) -> str:
    if not HUB_REPO.fullmatch(repo) or ".." in repo or "--" in repo:
        raise PolicyError(f"{path}: {where} must be a Hub repository id 'org/name' (letters, digits, '_', '.' and "
                          f"'-'), not {shown(repo)}.")
    return repo


def _hub_uri(text: str, where: str, path: Path) -> str:
    """A base on the Hub, ``hf://org/name`` or ``hf://org/name@revision``."""
    uri = HubUri.parse(text)
    assert uri is not None
    _hub_repo(uri.repo, where, path)
    if uri.revision is not None and (not uri.revision or not uri.revision.isprintable()):
        raise PolicyError(f"{path}: {where} names no usable revision after '@' in {shown(text)}; give a branch, tag "
                          "or commit id, or drop the '@'.")
    return text


def _gate(data: Any, where: str, path: Path, local: Any) -> GateConfig:
    table = _Table(data, where, path)
    minimums = table.take("min", dict, {})
    ratio = table.take("max_update_ratio", float)
    config = GateConfig(max_update_ratio=_number(ratio, f"{where}.max_update_ratio", path) if ratio is not None
                        else None,
                        licenses=table.strings("licenses"),
                        max_base_relative_update=_number(table.take("max_base_relative_update", float, 0.5),
                                                         f"{where}.max_base_relative_update", path),
                        require_signature=table.take("require_signature", bool, False),
                        trusted_keys=tuple(local(k) for k in table.strings("trusted_keys") or ()),
                        eval=table.take("eval", str),
                        min={str(k): _number(v, f"{where}.min.{k}", path) for k, v in minimums.items()},
                        allow_protected=table.take("allow_protected", bool, False),
                        eval_timeout=_number(table.take("eval_timeout", float, 3600.0), f"{where}.eval_timeout", path),
                        eval_env=table.strings("eval_env") or ())
    table.done()
    if config.max_update_ratio is not None and config.max_update_ratio <= 0:
        raise PolicyError(f"{path}: {where}.max_update_ratio must be above 0, not {config.max_update_ratio!r}.")
    if not 0 < config.eval_timeout <= MAX_SECONDS:
        raise PolicyError(f"{path}: {where}.eval_timeout must be between 0 and {MAX_SECONDS:.0f} seconds, not "
                          f"{config.eval_timeout!r}.")
    if config.max_base_relative_update <= 0:
        raise PolicyError(f"{path}: {where}.max_base_relative_update must be above 0 (a bound on ‖τ‖/‖θ0‖ for a "
                          f"stream's first update), not {config.max_base_relative_update!r}.")
    if config.require_signature and not config.trusted_keys:
        raise PolicyError(f"{path}: {where}.require_signature needs trusted_keys (public key files).")
    return config


def _publish(data: Any, where: str, path: Path, local: Any) -> PublishConfig:
    table = _Table(data, where, path)
    to, hub = table.take("to", str), table.take("hub", str)
    adapter = table.take("as_adapter", dict)
    config = PublishConfig(to=local(to) if to is not None else None,
                           hub=_hub_repo(hub, f"{where}.hub", path) if hub is not None else None,
                           protect=table.take("protect", bool, False),
                           sign=table.take("sign", bool, True),
                           as_adapter=_adapter_rank(adapter, f"{where}.as_adapter", path) if adapter is not None
                           else None)
    table.done()
    if to is None and hub is None:
        raise PolicyError(f"{path}: {where} needs 'to' (a local folder) or 'hub' (org/repo).")
    if config.protect and config.as_adapter is not None:
        raise PolicyError(f"{path}: {where} has both protect = true and as_adapter, which cannot go together: "
                          "MergeLock protects a full model's weights, and an adapter is added to the unprotected "
                          "base; drop one of them.")
    return config


def _adapter_rank(data: Any, where: str, path: Path) -> int:
    table = _Table(data, where, path)
    rank = table.take("rank", int, required=True)
    table.done()
    if not 1 <= rank <= MAX_ADAPTER_RANK:
        raise PolicyError(f"{path}: {where}.rank must be between 1 and {MAX_ADAPTER_RANK}, not {rank}.")
    return int(rank)


def _number(value: Any, where: str, path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise PolicyError(f"{path}: {where} must be a finite number, not {shown(value)}.")
    return float(value)
