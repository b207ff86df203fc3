"""Policy files are parsed strictly, and every error names the key or file at fault."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import hypothesis
import hypothesis.strategies as st
import pytest

from mergeops.errors import PolicyError
from mergeops.policy import STREAM_NAME, load_policy

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
    ('[streams.b]\nbase = "models/base"\nmethod = "average"\noutput = "state/streams/x"\n', "the home"),
])
def test_streams_that_would_write_into_each_others_folders_are_refused_naming_both(tmp_path, monkeypatch, extra,
                                                                                   message):
    monkeypatch.delenv("MERGEOPS_HOME", raising=False)
    with pytest.raises(PolicyError, match=message) as caught:
        load_policy(write(tmp_path, GOOD + extra))
    assert "[streams.a" in str(caught.value) or "[streams.b" in str(caught.value)


def expect_refusal(tmp_path, text: str, message: str) -> PolicyError:
    with pytest.raises(PolicyError) as caught:
        load_policy(write(tmp_path, text))
    assert message in str(caught.value), str(caught.value)
    assert str(tmp_path / "policy.toml") in str(caught.value) and "\n" not in str(caught.value)
    return caught.value


STREAM_B = '[streams.b]\nbase = "models/base"\nmethod = "average"\noutput = "merged/b"\n'


@pytest.mark.parametrize("extra", [
    '[[streams.a.watch]]\npath = "merged/a"\n',  # its own output
    '[[streams.a.watch]]\npath = "merged/a/incoming"\n',  # a folder inside its own output
    '[[streams.a.watch]]\npath = "merged"\n',  # a folder its output lies in
    '[[streams.a.watch]]\npath = "published/a"\n',  # its own publish folder
    STREAM_B + '[[streams.b.watch]]\npath = "merged/a"\n[[streams.a.watch]]\npath = "merged/b"\n',  # each other's
])
def test_a_stream_that_would_fold_its_own_or_anothers_output_is_refused(tmp_path, monkeypatch, extra):
    monkeypatch.delenv("MERGEOPS_HOME", raising=False)
    refusal = expect_refusal(tmp_path, GOOD + extra, "overlap")
    assert "watch]].path" in str(refusal) and "without end" in str(refusal)


def test_a_symlinked_folder_counts_where_it_leads(tmp_path, monkeypatch):
    monkeypatch.delenv("MERGEOPS_HOME", raising=False)
    (tmp_path / "merged" / "a").mkdir(parents=True)
    (tmp_path / "alias").symlink_to(tmp_path / "merged" / "a")
    expect_refusal(tmp_path, GOOD + '[[streams.a.watch]]\npath = "alias"\n', "without end")


def test_a_hub_repository_a_stream_publishes_to_is_not_watched(tmp_path, monkeypatch):
    monkeypatch.delenv("MERGEOPS_HOME", raising=False)
    text = GOOD.replace('to = "published/a"', 'hub = "acme/merged"') + '[[streams.a.watch]]\nhub = "Acme/Merged"\n'
    expect_refusal(tmp_path, text, "without end")


@pytest.mark.parametrize(("change", "message"), [
    (("output = \"merged/a\"", 'output = "models/base"'), "would change or delete the base"),
    (("output = \"merged/a\"", 'output = "models/base/merged"'), "would change or delete the base"),
    (("output = \"merged/a\"", 'output = "models"'), "would change or delete the base"),
    (('to = "published/a"', 'to = "models/base"'), "would change or delete the base"),
    (('path = "registry"', 'path = "state"'), "take the home's folders for checkpoints"),
    (('path = "registry"', 'path = "."'), "take the home's folders for checkpoints"),
    (('home = "state"', 'home = "merged/a/state"'), "taken for each other"),
])
def test_outputs_bases_registries_and_the_home_stay_apart(tmp_path, monkeypatch, change, message):
    monkeypatch.delenv("MERGEOPS_HOME", raising=False)
    expect_refusal(tmp_path, GOOD.replace(*change), message)


@pytest.mark.parametrize("name", ["a/b", "..", "a..b", "../escape", "-a", ".hidden", "a b", "x" * 65, "x" * 10_000,
                                  "é"])
def test_stream_names_are_safe_folder_names(tmp_path, monkeypatch, name):
    monkeypatch.delenv("MERGEOPS_HOME", raising=False)
    text = GOOD.replace("streams.a", f'streams."{name}"').replace('output = "merged/a"\n', "")
    expect_refusal(tmp_path, text, "safe name" if len(name) <= 128 else "keys are names")


@pytest.mark.parametrize(("change", "message"), [
    (("keep = 5", "keep = 1_000_000_000_000_000_000_000_000_000_000"), "too large for any setting"),
    (("keep = 5", "keep = 1_000_000"), "keep must be between 1 and 100000"),
    (("settle_seconds = 2", "settle_seconds = -1"), "settle_seconds must be between 0 and 604800"),
    (("settle_seconds = 2", "settle_seconds = nan"), "settle_seconds must be a finite number, not nan"),
    (("settle_seconds = 2", "settle_seconds = 1e300"), "settle_seconds must be between 0 and 604800"),
    (("settle_seconds = 2", "settle_seconds = 2\npoll_seconds = 0"), "poll_seconds must be between 1 and"),
    (("settle_seconds = 2", "settle_seconds = 2\npoll_seconds = -inf"), "poll_seconds must be a finite number"),
    (("max_update_ratio = 4", "max_update_ratio = -1"), "max_update_ratio must be above 0"),
    (("max_update_ratio = 4", "max_update_ratio = inf"), "max_update_ratio must be a finite number, not inf"),
    (('to = "published/a"', 'hub = "not-a-repo"'), "must be a Hub repository id 'org/name'"),
    (('to = "published/a"', 'hub = "a/b/c"'), "must be a Hub repository id 'org/name'"),
    (('to = "published/a"', 'hub = "../x"'), "must be a Hub repository id 'org/name'"),
    (('path = "registry"', 'hub = "org/na..me"'), "must be a Hub repository id 'org/name'"),
    (('base = "models/base"', 'base = "hf://justaname"'), "must be a Hub repository id 'org/name'"),
    (('base = "models/base"', 'base = "hf://org/name@"'), "no usable revision"),
    (('base = "models/base"', 'base = "models/\\u0000base"'), "NUL"),
    (('home = "state"', 'home = "st\\u0000ate"'), "NUL"),
    (('base = "models/base"', f'base = "{"x" * 5000}"'), "too long (at most 4095 bytes"),
    (('base = "models/base"', f'base = "models/{"x" * 300}"'), "255 per folder or file name"),
    (('base = "models/base"', f'base = "{"x/" * 9000}"'), "is 18000 characters long"),
    (("keep = 5", f'{"k" * 10_000} = 1'), "keys are names of at most 128"),
    (('licenses = ["mit"]', "licenses = [1, {a = 1}]"), "licenses must be a list of strings"),
    (('path = "registry"', 'path = ""'), "the path '' is empty or too long"),
    (('settle_seconds = 2', 'settle_seconds = 2\nmarker = "../../etc/passwd"'), "marker must be a file name"),
    (('settle_seconds = 2', 'settle_seconds = 2\nmarker = "/etc/passwd"'), "marker must be a file name"),
    (('home = "state"', "deep = " + "[" * 5000 + "]" * 5000 + '\nhome = "state"'), "nests deeper than"),
])
def test_odd_values_are_one_sentence_policy_errors(tmp_path, monkeypatch, change, message):
    monkeypatch.delenv("MERGEOPS_HOME", raising=False)
    text = GOOD.replace("method = \"opcm\"", 'method = "opcm"\nkeep = 5').replace(*change)
    refusal = expect_refusal(tmp_path, text, message)
    assert len(str(refusal)) < 600  # the value is cut short in the message


@pytest.mark.timeout(60)
def test_a_policy_of_more_than_a_thousand_streams_is_refused(tmp_path):
    stream = '[streams.s{i}]\nbase = "b"\nmethod = "average"\n[[streams.s{i}.watch]]\npath = "r/{i}"\n'
    expect_refusal(tmp_path, "".join(stream.format(i=i) for i in range(1001)), "1001 streams, more than the 1000")
    assert len(load_policy(write(tmp_path, "".join(stream.format(i=i) for i in range(1000)))).streams) == 1000


@pytest.mark.timeout(60)
def test_a_policy_file_that_is_too_large_or_a_fifo_is_refused(tmp_path):
    big = tmp_path / "big.toml"
    big.write_text(GOOD + "# " + "x" * (2 << 20) + "\n")
    with pytest.raises(PolicyError, match=r"cannot read policy file .* larger than"):
        load_policy(big)
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    with pytest.raises(PolicyError, match=r"cannot read policy file .* FIFO"):
        load_policy(fifo)


def toml_value(value) -> str:
    """``value`` written as TOML (strings as JSON writes them: TOML reads the same escapes, and refuses the rest)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, float):
        return {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(repr(value), repr(value))
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    return str(value)


ODD_TEXT = st.one_of(st.text(max_size=40), st.text(alphabet="./\x00-_ aé", max_size=12),
                     st.just("x" * 5000), st.just(".."), st.just("/"), st.just(""))
ODD_SCALAR = st.one_of(ODD_TEXT, st.integers(), st.integers(min_value=-(10**39), max_value=10**39),
                       st.floats(allow_nan=True, allow_infinity=True), st.booleans())
ODD_VALUE = st.recursive(ODD_SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                             st.dictionaries(ODD_TEXT, inner, max_size=2)),
                         max_leaves=6)
SLOTS = ['home = "state"', 'base = "models/base"', 'output = "merged/a"', 'path = "registry"', "settle_seconds = 2",
         "max_update_ratio = 4", 'licenses = ["mit"]', 'to = "published/a"', "alpha = 0.7"]


@pytest.mark.timeout(300)
@hypothesis.settings(max_examples=300, deadline=None, database=None)
@hypothesis.seed(22)
@hypothesis.given(slot=st.sampled_from([*SLOTS, "stream name"]), value=ODD_VALUE)
def test_any_odd_value_anywhere_is_a_policy_or_a_one_sentence_policy_error(slot, value):
    if slot == "stream name":
        text = GOOD.replace("streams.a", f"streams.{json.dumps(value if isinstance(value, str) else 'a')}")
    else:
        text = GOOD.replace(slot, f"{slot.split(' = ')[0]} = {toml_value(value)}")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "policy.toml"
        path.write_text(text, errors="surrogatepass")
        try:
            policy = load_policy(path)
        except PolicyError as refusal:
            assert "\n" not in str(refusal) and len(str(refusal)) < 1000, str(refusal)
            return
        assert all(STREAM_NAME.fullmatch(name) and ".." not in name for name in policy.streams)
