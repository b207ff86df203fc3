"""The one door for files mergeops did not write (``mergeops.untrusted``): what it refuses, at once and by name."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from mergeops import untrusted
from mergeops.errors import ModelFolderError, UntrustedFileError


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def refusal(read, path, **limits) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(UntrustedFileError) as caught:
        read(path, **limits)
    assert str(path) in str(caught.value) and isinstance(caught.value, ModelFolderError)
    return caught.value.reason


READERS = [untrusted.read_bytes, untrusted.read_text, untrusted.read_json, untrusted.read_toml, untrusted.open_fd]


@pytest.mark.timeout(20)
@pytest.mark.parametrize("read", READERS, ids=lambda f: f.__name__)
def test_a_fifo_is_refused_at_once_not_waited_on(tmp_path, read):
    assert "is a FIFO, not a regular file" in refusal(read, fifo(tmp_path / "config.json"))


@pytest.mark.timeout(20)
def test_a_symlink_to_a_fifo_is_a_fifo(tmp_path):
    (tmp_path / "config.json").symlink_to(fifo(tmp_path / "pipe"))
    assert "is a FIFO" in refusal(untrusted.read_json, tmp_path / "config.json")


@pytest.mark.timeout(20)
def test_dev_zero_as_a_config_is_refused_not_read_forever(tmp_path):
    (tmp_path / "config.json").symlink_to("/dev/zero")
    assert "is a character device" in refusal(untrusted.read_json, tmp_path / "config.json")


@pytest.mark.timeout(20)
@pytest.mark.skipif(not os.access("/proc/kmsg", os.R_OK), reason="only root may read /proc/kmsg")
def test_a_kernel_file_that_says_it_is_empty_is_not_waited_on(tmp_path):
    """/proc/kmsg is a regular file of 0 bytes whose read blocks until the kernel logs something: a config linked to
    it is empty (so no JSON), not a process stopped for good."""
    (tmp_path / "config.json").symlink_to("/proc/kmsg")
    assert untrusted.read_bytes(tmp_path / "config.json") == b""
    assert "is not valid JSON" in refusal(untrusted.read_json, tmp_path / "config.json")


@pytest.mark.timeout(20)
@pytest.mark.parametrize(("make", "words"), [
    (lambda p: p.mkdir(), "is a folder"),
    (lambda p: p.symlink_to(p.parent / "nowhere"), "cannot be opened (No such file or directory)"),
    (lambda p: (p.symlink_to(p), None)[1], "cannot be opened (Too many levels of symbolic links)"),
], ids=["folder", "dangling link", "link loop"])
def test_what_is_no_regular_file_is_refused_by_name(tmp_path, make, words):
    make(tmp_path / "config.json")
    assert words in refusal(untrusted.read_bytes, tmp_path / "config.json")


def test_a_file_over_its_cap_is_refused_before_it_is_read(tmp_path):
    (tmp_path / "config.json").write_bytes(b" " * 1001)
    assert refusal(untrusted.read_bytes, tmp_path / "config.json", max_bytes=1000) == (
        "is 1001 bytes, larger than the 1000 bytes such a file may be")
    assert untrusted.read_bytes(tmp_path / "config.json", max_bytes=1001) == b" " * 1001


@pytest.mark.timeout(20)
def test_a_file_that_grows_while_it_is_read_is_refused(tmp_path, monkeypatch):
    """The size is taken before reading; a writer that appends after that is caught by reading one byte more."""
    path = tmp_path / "config.json"
    path.write_bytes(b"x" * 100)
    real_fstat, calls = os.fstat, []

    def fstat_then_grow(fd):  # type: ignore[no-untyped-def]
        info = real_fstat(fd)
        calls.append(fd)
        if len(calls) == 2:  # open_fd's check, then read_bytes's size: after that, another process appends
            with open(path, "ab") as f:
                f.write(b"y" * 100)
        return info

    monkeypatch.setattr(untrusted.os, "fstat", fstat_then_grow)
    assert "grew past 150 bytes while it was read" in refusal(untrusted.read_bytes, path, max_bytes=150)


@pytest.mark.parametrize(("text", "words"), [
    ("[" * 100_000 + "]" * 100_000, "nests deeper than 64 levels"),
    ("[" * 65 + "]" * 65, "nests deeper than 64 levels"),
    ('{"n": ' + "9" * 5000 + "}", "holds an integer of 5000 digits"),
    ('{"n": -' + "9" * 41 + "}", "holds an integer of 41 digits"),
    ('{"n": 1e400}', "holds the number 1e400, which is not finite"),
    ('{"n": NaN}', "holds NaN, which is not a JSON number"),
    ('{"n": -Infinity}', "holds -Infinity, which is not a JSON number"),
    ('{"a": 1, "b": {"k": 1, "k": 2}}', "gives the key 'k' twice in one object"),
    ('{"a": "\\ud800"}', "holds a lone surrogate"),
    ('{"\\udfff": 1}', "holds a lone surrogate"),
    ('{"a": 1', "is not valid JSON"),
])
def test_json_is_parsed_with_limits(tmp_path, text, words):
    (tmp_path / "config.json").write_text(text)
    assert words in refusal(untrusted.read_json, tmp_path / "config.json")


def test_json_within_the_limits_reads_as_json(tmp_path):
    document = {"a": [[[1]]] * 3, "n": -(10 ** 39), "x": 1.5e300, "s": "\U0001f600 caf\u00e9", "t": [True, None]}
    (tmp_path / "config.json").write_text(json.dumps(document))
    assert untrusted.read_json(tmp_path / "config.json") == document
    nested = "[" * 64 + "]" * 64
    assert untrusted.parse_json(nested, "x") is not None


def test_text_must_be_utf8(tmp_path):
    (tmp_path / "config.json").write_bytes(b'{"a": "caf\xe9"}')
    assert refusal(untrusted.read_json, tmp_path / "config.json") == "is not UTF-8 text (byte 10); save it as UTF-8"


@pytest.mark.parametrize(("text", "words"), [
    ("x = " + "9" * 5000, "holds an integer of more than 40 digits"),
    ("x = " + "9" * 41, "holds an integer of more than 40 digits"),
    ("x = " + "[" * 100_000, "nests deeper than 64 levels"),
    ("x = nan", "holds nan, which is not a finite number"),
    ("x = -inf", "holds -inf, which is not a finite number"),
    ('x = "a\\u0000b"', "holds a NUL character"),
    ("x = 1\nx = 2", "is not valid TOML"),
])
def test_toml_is_parsed_with_limits(tmp_path, text, words):
    (tmp_path / "policy.toml").write_text(text + "\n")
    assert words in refusal(untrusted.read_toml, tmp_path / "policy.toml")


@pytest.mark.timeout(20)
def test_open_fd_gives_a_blocking_descriptor_of_the_regular_file(tmp_path):
    (tmp_path / "w").write_bytes(b"abc")
    fd = untrusted.open_fd(tmp_path / "w")
    try:
        assert os.get_blocking(fd) and os.pread(fd, 3, 0) == b"abc"
    finally:
        os.close(fd)



def test_nan_and_infinity_pass_only_when_the_caller_checks_numbers_itself():
    document = untrusted.parse_json('{"loss": NaN, "n": -Infinity, "x": 1e400}', "s", finite=False)
    assert math.isnan(document["loss"]) and document["n"] == -math.inf == -document["x"]
    with pytest.raises(UntrustedFileError, match="integer of 41 digits"):  # the other limits stay
        untrusted.parse_json('{"n": ' + "9" * 41 + ', "loss": NaN}', "s", finite=False)
    assert math.isinf(untrusted.parse_toml(b"x = inf\n", "p", finite=False)["x"])
