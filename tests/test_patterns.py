"""Patterns from files mergeops did not write match as Python's ``re`` matches them, in bounded time: through RE2
(linear in the name) whenever RE2 can express them, else through Python's ``re`` in a child process with a time and
memory limit; a pattern that cannot be matched within them is refused by name, never run without bound."""

from __future__ import annotations

import re
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mergeops import patterns
from mergeops.patterns import CHILD_SECONDS, MAX_PATTERN_CHARS, PatternError

pytestmark = pytest.mark.filterwarnings("ignore:Possible nested set:FutureWarning")  # "[[:alpha:]]", on purpose

# Module names of real models (llama, gpt2, bert, t5, a vision tower) and names only an attacker writes.
NAMES = [
    "model.layers.0.self_attn.q_proj", "model.layers.11.self_attn.v_proj", "model.layers.3.mlp.down_proj",
    "model.embed_tokens", "lm_head", "transformer.h.0.attn.c_attn", "transformer.h.10.mlp.c_fc", "transformer.wte",
    "bert.encoder.layer.2.attention.self.query", "encoder.block.0.layer.0.SelfAttention.q",
    "decoder.block.1.layer.1.EncDecAttention.v", "vision_tower.blocks.0.attn.qkv", "model.layers.1.self_attn.Q_PROJ",
    "q_proj", "", "a", "i", "I", "k", "s", "aaa", "{,3}", "[]", "a]", "x", "1", "_", " ", "a b", "a\tb",
    "x\n", "q_proj\n", "model.layers.\u0661.q_proj", "\u0131", "\u212a", "\u017f", "caf\u00e9", "a\x0bb", "\ud800",
]

# target_modules and rank/alpha keys as configs on the Hub and peft's documentation write them, and the corners where
# RE2's syntax means something else than Python's.
PATTERNS = [
    r".*\.(q_proj|v_proj)", r".*(q_proj|v_proj|k_proj|o_proj)$", r"model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj",
    r".*decoder.*(SelfAttention|EncDecAttention).*(q|v)$", r"^(?!.*vision).*\.(q_proj|v_proj)$",
    r"layers\.[0-9]+\.mlp\..*", r".*\.layers\.(1[0-5]|[0-9])\.self_attn\.[qv]_proj", r"(?i).*q_proj",
    r"transformer\.h\.\d+\.(attn\.c_attn|mlp\.c_fc)", r".*\.(q|v)_proj+", r"(\w+)\.\1", re.escape("model.embed_tokens"),
    "q_proj", "lm_head", r"a{,3}", r"[[:alpha:]]", r"(?i)\u0131", r"(?i)[j-l]", r"(?i)\u212a", r"(?i)S", r"\d", r"\w+",
    r"\s", r"\S+", r"[^a]", r"(?s).", r".", r"x$", r"x\Z", r"(?m)^x$", r"\bq_proj", r"\Bq_proj", r"(?a)\w+",
    r"(?a:\d)", r"[\d.]+", r"[^\W\d]+", r"x*?", r"(?:a|b)+?", r"a{2}", r"(?P<n>a)(?P=n)", r"(?=a)\w", r"(?<=a)b",
    r"(?>a+)a", r"a++", r"(a)?(?(1)b|c)", r"[\u0100-\u0200]", r"(?i)[\u0100-\u0200]", r"[^\u0100-\u0200]", r"",
]


def python_matches(source: str, whole: bool, names: list[str]) -> set[str]:
    test = re.compile(source).fullmatch if whole else re.compile(source).match
    return {name for name in names if test(name)}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("whole", [True, False])
def test_real_and_corner_patterns_match_what_pythons_re_matches(whole):
    compiled = [patterns.compile(source, whole=whole) for source in PATTERNS]
    found = patterns.matching(compiled, NAMES)
    for source, matched in zip(PATTERNS, found, strict=True):
        assert matched == python_matches(source, whole, NAMES), source


def test_patterns_re2_expresses_run_in_the_parent_and_the_others_in_the_child():
    for source in (r".*\.(q_proj|v_proj)", r"a{,3}", r"[[:alpha:]]", r"x\Z", r".*\.(q|v)_proj+", "(a+)+b"):
        assert patterns.compile(source).linear is not None, source
    for source in (r"(\w+)\.\1", r"(?=a)\w", r"(?<=a)b", r"(?>a+)a", r"a++", r"(a)?(?(1)b|c)", "a{1001}"):
        assert patterns.compile(source).linear is None, source


ATOMS = st.sampled_from(["a", "q", "K", ".", r"\.", "_", "0", " ", "[a-q]", "[^.]", r"\d", r"\w", r"\s", r"\W",
                         r"\b", "$", "^", r"\Z", r"\A", "[[:a]]", "[K]", "\u0131", "\u212a", r"\u017f"])


def regexes(depth: int = 2) -> st.SearchStrategy[str]:
    """Small regular expressions of the syntax module patterns use, nested a little."""
    def grow(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        quantified = st.tuples(inner, st.sampled_from(["*", "+", "?", "{1,2}", "{,2}", "{2}", "*?", ""])).map("".join)
        sequence = st.lists(quantified, min_size=1, max_size=3).map("".join)
        return st.one_of(sequence, st.tuples(sequence, sequence).map("|".join),
                         st.tuples(st.sampled_from(["(", "(?:", "(?i:", "(?s:", "(?a:"]), sequence).map(
                             lambda t: f"{t[0]}{t[1]})"))
    return st.recursive(ATOMS, grow, max_leaves=6)


@pytest.mark.timeout(300)
@settings(max_examples=300, deadline=None)
@given(source=regexes(), flags=st.sampled_from(["", "(?i)", "(?m)", "(?s)", "(?a)"]),
       names=st.lists(st.text("aqK._0 \u0131\u212a\n", max_size=6), min_size=1, max_size=6), whole=st.booleans())
def test_any_small_pattern_matches_what_pythons_re_matches(source, flags, names, whole):
    source = flags + source
    try:
        re.compile(source)
    except re.error:
        with pytest.raises(PatternError, match="not a regular expression PEFT can use"):
            patterns.compile(source, whole=whole)
        return
    assert patterns.matching([patterns.compile(source, whole=whole)], names)[0] == python_matches(source, whole, names)


def test_the_characters_python_folds_onto_printable_ascii_are_the_ones_the_rewrite_keeps():
    """A range is cut down to printable ASCII and the few characters Python's case-insensitive matching equates with
    one of them: the list is checked against every code point."""
    everything = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000)
    folding = {ord(found) for letter in map(chr, range(0x20, 0x7F))
               for found in re.compile("(?i)" + re.escape(letter)).findall(everything) if not found.isascii()}
    assert folding == set(patterns._FOLDS_TO_PRINTABLE)


CATASTROPHIC = {  # Python's re takes minutes to years on one of the names (to fail, or to find the match)
    "nested quantifier": ("(a+)+b", "a" * 5000, "a" * 5000 + "b"),
    "alternation that overlaps, repeated": ("(x|x?)+y", "x" * 5000, "x" * 5000 + "y"),
    "optional letters, no group": ("a?" * 40 + "a" * 40, "a" * 39, "a" * 40),
    "stars, no group": ("a*" * 20 + "c", "a" * 5000, "a" * 5000 + "c"),
    "dots, no group": (".*" * 20 + "!", "model.layers.0.self_attn.q_proj" * 200, "q_proj!"),
    "rank pattern as peft composes it": (r"(.*\.)?(.*.*.*.*.*x)$", "a." * 3000 + "b", "a." * 3000 + "x"),
}


@pytest.mark.timeout(20)
@pytest.mark.parametrize("case", sorted(CATASTROPHIC))
def test_a_pattern_that_backtracks_catastrophically_matches_in_linear_time(case):
    source, failing, matching = CATASTROPHIC[case]
    compiled = patterns.compile(source)
    assert compiled.linear is not None
    start = time.monotonic()
    assert patterns.matching([compiled], [failing, matching])[0] == {matching}
    assert time.monotonic() - start < 2  # RE2: milliseconds; Python's re would not finish


@pytest.mark.timeout(60)
def test_patterns_only_python_can_match_are_matched_in_one_child_for_all_names():
    spawned = []
    sys.addaudithook(lambda event, args: spawned.append(args) if event == "subprocess.Popen" else None)
    sources = [r"^(?!.*vision).*\.(q_proj|v_proj)$", r"(\w+)\.\1", r"(?<=\.)q_proj"]
    names = NAMES * 20
    before = len(spawned)
    found = patterns.matching([patterns.compile(source) for source in sources], names)
    assert len(spawned) == before + 1
    assert found == [python_matches(source, True, names) for source in sources]
    assert "model.layers.0.self_attn.q_proj" in found[0] and "model.layers.3.mlp.down_proj" not in found[0]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("source", [r"(?=a)(a|a?)+b", "(?=a)" + "a?" * 40 + "a" * 40, r"(a)(\1|a?)+b"])
def test_a_hostile_pattern_only_python_can_match_is_refused_within_the_limit(source):
    start = time.monotonic()
    with pytest.raises(PatternError, match=rf"took longer than {CHILD_SECONDS:g} s to match; name the modules"):
        patterns.matching([patterns.compile("q_proj"), patterns.compile(source)], ["q_proj", "a" * 40, "a" * 5000])
    assert time.monotonic() - start < CHILD_SECONDS + 10


@pytest.mark.timeout(60)
def test_a_pattern_that_needs_too_much_memory_is_refused():
    with pytest.raises(PatternError, match=r"needed more than \d+ MiB to match"):
        patterns.matching([patterns.compile(r"(?=a)(?:(a)|b)*c")], ["a" * 3_000_000])


@pytest.mark.parametrize(("source", "needle"), [
    ("(" * 900 + ")" * 900, "nests groups too deeply"),
    ("a" * (MAX_PATTERN_CHARS + 1), f"at most {MAX_PATTERN_CHARS}"),
    ("(q|v", "not a regular expression PEFT can use"),
    ("(?i)q|(?s)v", "not a regular expression PEFT can use"),
    (r"\p{L}", "not a regular expression PEFT can use"),  # RE2 would take it
])
def test_a_pattern_python_cannot_read_is_refused_by_name(source, needle):
    with pytest.raises(PatternError, match=re.escape(needle)) as refused:
        patterns.compile(source)
    assert repr(source[:200]) in str(refused.value)


@pytest.mark.timeout(60)
def test_an_error_only_pythons_compiler_finds_is_refused_when_matched():
    with pytest.raises(PatternError, match="look-behind requires fixed-width pattern"):
        patterns.matching([patterns.compile(r"(?<=a+)b")], ["ab"])
