"""Policy files are parsed strictly, and every error names the key or file at fault."""

from __future__ import annotations

import os
import re

import pytest

from mergeops.errors import PolicyError
from mergeops.policy import load_policy

GOOD = """
home = "state"
[keys]
signing = "keys/signing.pem"
[streams.a]
base = "models/base"
method = "opcm"
output = "merged/a"
[streams.a.params]
alpha = 0.7
[[streams.a.watch]]
path = "registry"
settle_seconds = 2
[streams.a.gate]
max_update_ratio = 4
licenses = ["mit"]
[streams.a.publish]
to = "published/a"
"""


def write(tmp_path, text):
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return path


def test_a_good_policy_resolves_paths_and_fills_defaults(tmp_path, monkeypatch):
    monkeypatch.delenv("MERGEOPS_HOME", raising=False)
    policy = load_policy(write(tmp_path, GOOD))
    stream = policy.stream(None)
    assert policy.home == tmp_path / "state"
    assert stream.base == tmp_path / "models" / "base" and stream.output == tmp_path / "merged" / "a"
    assert stream.params == {"alpha": 0.7, "zero_diagonal": False, "project": [], "skip": []}
    assert stream.watch[0].path == tmp_path / "registry" and stream.watch[0].settle_seconds == 2.0
    assert stream.gate.max_update_ratio == 4.0 and stream.gate.licenses == ("mit",)
    assert stream.gate.allow_protected is False  # MergeLock-protected checkpoints are rejected unless allowed
    assert load_policy(write(tmp_path, GOOD.replace("licenses", "allow_protected = true\nlicenses"))
                       ).stream(None).gate.allow_protected is True
    assert stream.keep == 5 and stream.dtype == "base" and stream.vocab == "reject"
    vocab_base = GOOD.replace("output = ", 'vocab = "base"\noutput = ')
    assert load_policy(write(tmp_path, vocab_base)).stream(None).vocab == "base"
    assert policy.digest.startswith("sha256:")


def test_mergeops_home_overrides_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEOPS_HOME", str(tmp_path / "elsewhere"))
    assert load_policy(write(tmp_path, GOOD)).home == tmp_path / "elsewhere"


@pytest.mark.parametrize(("change", "message"), [
    (("output = ", "outptu = "), "unknown key 'outptu' in [streams.a] (did you mean 'output'?)"),
    (("alpha = 0.7", "alpah = 0.7"), "unknown parameter 'alpah' for method opcm (did you mean 'alpha'?)"),
    (("alpha = 0.7", "alpha = 1.5"), "alpha must be between 0 and 1"),
    (("alpha = 0.7", 'alpha = "high"'), "alpha must be a float"),
    (('method = "opcm"', 'method = "slerp"'), "unknown merge method 'slerp'"),
    (("settle_seconds = 2", "settle_seconds = true"), "settle_seconds must be a float"),
    (('path = "registry"', 'hub = "o/r"\npath = "registry"'), "exactly one of 'path'"),
    (('home = "state"', 'hoem = "state"'), "unknown key 'hoem' in the top level (did you mean 'home'?)"),
    (('base = "models/base"', ""), "[streams.a] needs a 'base' key"),
    (("licenses", 'allow_protected = "yes"\nlicenses'), "allow_protected must be a bool"),
    (("alpha = 0.7", "alpha = nan"), "alpha must be a finite number, not nan"),
    (("output = ", 'vocab = "resize"\noutput = '), "[streams.a].vocab must be one of reject, base, not 'resize'"),
    (("output = ", 'vocabulary = "base"\noutput = '),
     "unknown key 'vocabulary' in [streams.a] (did you mean 'vocab'?)"),
    (('method = "opcm"\n', 'method = "task_arithmetic"\n'), "unknown parameter 'alpha'"),
])
def test_mistakes_are_named_with_a_suggestion(tmp_path, monkeypatch, change, message):
    monkeypatch.delenv("MERGEOPS_HOME", raising=False)
    with pytest.raises(PolicyError) as caught:
        load_policy(write(tmp_path, GOOD.replace(*change)))
    assert message in str(caught.value) and str(tmp_path / "policy.toml") in str(caught.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(PolicyError, match="cannot read policy file"):
        load_policy(tmp_path / "nope.toml")
    with pytest.raises(PolicyError, match="not valid TOML"):
        load_policy(write(tmp_path, "home = [unclosed"))


@pytest.mark.timeout(20)
@pytest.mark.parametrize(("spoil", "words"), [
    (lambda p: os.mkfifo(p), "is a FIFO, not a regular file"),
    (lambda p: p.symlink_to("/dev/zero"), "is a character device, not a regular file"),
    (lambda p: p.write_text("home = " + "9" * 5000 + "\n"), "holds an integer of more than 40 digits"),
    (lambda p: p.write_text("home = " + "[" * 100_000 + "\n"), "nests deeper than 64 levels"),
    (lambda p: p.write_bytes(b'home = "caf\xe9"\n'), "is not UTF-8 text"),
    (lambda p: p.write_text("home = 'x'\n" * 200_000), "larger than the 1 MiB"),
], ids=["FIFO", "/dev/zero", "5000-digit integer", "nested 100000 deep", "not UTF-8", "10 MB"])
def test_a_hostile_policy_file_is_a_policy_error_naming_it_at_once(tmp_path, spoil, words):
    spoil(tmp_path / "policy.toml")
    with pytest.raises(PolicyError) as caught:
        load_policy(tmp_path / "policy.toml")
    assert words in str(caught.value) and str(tmp_path / "policy.toml") in str(caught.value)
    assert caught.value.exit_code == 2


def test_choosing_a_stream(tmp_path):
    policy = load_policy(write(tmp_path, GOOD + '\n[streams.b]\nbase = "x"\nmethod = "average"\n'))
    with pytest.raises(PolicyError, match="choose one with --stream"):
        policy.stream(None)
    with pytest.raises(PolicyError, match="no stream 'c'"):
        policy.stream("c")
    assert policy.stream("b").params == {}


@pytest.mark.parametrize(("method", "value", "message"), [
    ("task_arithmetic", "nan", "lambda must be a finite number, not nan"),
    ("ties", "inf", "lambda must be a finite number, not inf"),
    ("magmax", "-inf", "lambda must be a finite number, not -inf"),
    ("task_arithmetic", "1e39", "lambda must be between -100 and 100, not 1e+39"),
])
def test_non_finite_and_absurd_parameters_are_refused_at_load_time(tmp_path, monkeypatch, method, value, message):
    monkeypatch.delenv("MERGEOPS_HOME", raising=False)
    text = GOOD.replace('method = "opcm"', f'method = "{method}"').replace("alpha = 0.7", f"lambda = {value}")
    with pytest.raises(PolicyError, match=re.escape(message)):
        load_policy(write(tmp_path, text))


@pytest.mark.parametrize(("extra", "message"), [
    ('[streams.b]\nbase = "models/base"\nmethod = "average"\noutput = "merged/a"\n', "overlap"),
    ('[streams.b]\nbase = "models/base"\nmethod = "average"\noutput = "merged/a/inner"\n', "overlap"),
    ('[streams.b]\nbase = "models/base"\nmethod = "average"\noutput = "elsewhere"\n'
     '[streams.b.publish]\nto = "published/a"\n', "overlap"),
    ('[streams.b]\nbase = "models/base"\nmethod = "average"\noutput = "state/streams/x"\n', "stream states"),
])
def test_streams_that_would_write_into_each_others_folders_are_refused_naming_both(tmp_path, monkeypatch, extra,
                                                                                   message):
    monkeypatch.delenv("MERGEOPS_HOME", raising=False)
    with pytest.raises(PolicyError, match=message) as caught:
        load_policy(write(tmp_path, GOOD + extra))
    assert "[streams.a" in str(caught.value) or "[streams.b" in str(caught.value)
