"""Regular expressions from files mergeops did not write (an adapter's ``target_modules``, ``rank_pattern``, ...),
matched with Python's ``re`` semantics in bounded time.

Python's ``re`` backtracks: ``(x|x?)*c`` or ``a*a*…a*c`` against a long name runs for years inside C code that ignores
signals, and a daemon reading untrusted folders would sit at 100 % CPU. So a pattern is parsed by Python's own parser
(its meaning is Python's, as for PEFT), written out again as an RE2 expression and matched by RE2, which does not
backtrack: time linear in the name. What RE2 cannot express (backreferences, lookarounds, atomic groups, possessive
repeats, counts over 1000) is matched by Python's ``re`` in a child process with a time and memory limit, all names
of one call in one child.

Written out again rather than handed over: on syntax both accept, RE2 and Python disagree ("a{,3}", "[[:alpha:]]",
"(?U)", "(?i)ı" against "i", "$" before a final newline, "\\d" against non-ASCII digits). Every character class is
therefore written as the printable ASCII characters Python's class matches, and anchors as what they mean in a name
without line breaks, so RE2 is exact for names of printable ASCII (every real module name); any other name is matched
in the child.
"""

from __future__ import annotations

import functools
import json
import math
import re
import subprocess
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from re import _constants as sre  # the parser's tree: the meaning Python gives a pattern
from re import _parser
from typing import Any

import re2

from mergeops.errors import ModelFolderError

MAX_PATTERN_CHARS = 4096  # far beyond any real module pattern; bounds the work of reading one
CHILD_SECONDS = 3.0
CHILD_MEMORY = 256 << 20

_PRINTABLE = "".join(map(chr, range(0x20, 0x7F)))
# The characters beyond printable ASCII that Python's case-insensitive matching equates with one in it (İ, ı, ſ, K);
# tests/test_patterns.py checks the list against every code point.
_FOLDS_TO_PRINTABLE = (0x130, 0x131, 0x17F, 0x212A)
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a pattern RE2 refuses goes to the child; that is no error worth logging


class PatternError(ModelFolderError):
    """A pattern of a file that cannot be used: not one PEFT can use, too long, or too slow or large to match."""

    def __init__(self, source: str, reason: str) -> None:
        self.source, self.reason = source, reason  # reason completes a sentence naming the pattern
        super().__init__(f"{_shown(source)} {reason}")


def _shown(source: str) -> str:
    return repr(source) if len(source) <= 200 else repr(source[:200]) + "…"


@dataclass(frozen=True)
class Pattern:
    """A compiled untrusted pattern; ``whole``: matched as ``re.fullmatch`` (else as ``re.match``)."""

    source: str
    whole: bool
    linear: Any = field(compare=False)  # the RE2 expression, or None when only Python's re can match it


@functools.lru_cache(maxsize=1024)
def compile(source: str, *, whole: bool = True) -> Pattern:
    """``source`` compiled once; raises :class:`PatternError` if it is too long or not a Python regular expression
    (errors only Python's compiler finds, such as a look-behind of varying width, are found when it is matched)."""
    if len(source) > MAX_PATTERN_CHARS:
        raise PatternError(source, f"is {len(source)} characters long, far beyond any module pattern (at most "
                           f"{MAX_PATTERN_CHARS}); name the modules instead")
    try:
        with warnings.catch_warnings():  # "possible nested set" and the like: the pattern's author's business
            warnings.simplefilter("ignore")
            tree = _parser.parse(source)
    except RecursionError:
        raise PatternError(source, "nests groups too deeply to be read; name the modules instead") from None
    except (sre.error, OverflowError, ValueError) as exc:
        raise PatternError(source, f"is not a regular expression PEFT can use ({exc})") from None
    try:
        linear = re2.compile(_rewrite(tree, tree.state.flags), _RE2_OPTIONS)
    except (_Unsupported, re2.error, RecursionError):
        linear = None
    return Pattern(source, whole, linear)


def matching(patterns: Sequence[Pattern], names: Sequence[str]) -> list[set[str]]:
    """For each pattern, the names it matches; raises :class:`PatternError` naming the first pattern the child could
    not match within its limits."""
    found: list[set[str]] = [set() for _ in patterns]
    plain = [name for name in names if name.isascii() and name.isprintable()]
    other = [name for name in names if not (name.isascii() and name.isprintable())]
    jobs: list[tuple[int, list[str]]] = []
    for index, pattern in enumerate(patterns):
        if pattern.linear is None:
            jobs.append((index, list(names)))
            continue
        test = pattern.linear.fullmatch if pattern.whole else pattern.linear.match
        found[index] = {name for name in plain if test(name) is not None}
        if other:
            jobs.append((index, other))
    for (index, job_names), matched in zip(jobs, _match_in_child([(patterns[i], n) for i, n in jobs]), strict=True):
        found[index] |= {job_names[i] for i in matched}
    return found


# --- Python's re in a child process --------------------------------------------------------------------------------

_CHILD = """
import json, re, resource, sys
memory, seconds = int(sys.argv[1]), int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_CPU, (seconds, seconds))  # ends it even if no parent is left to
for source, whole, names in json.load(sys.stdin):
    try:
        regex = re.compile(source)
    except (re.error, RecursionError, OverflowError, ValueError) as exc:
        print(json.dumps({"error": str(exc)}), flush=True)
        continue
    test = regex.fullmatch if whole else regex.match
    print(json.dumps([i for i, name in enumerate(names) if test(name)]), flush=True)
"""


def _match_in_child(jobs: list[tuple[Pattern, list[str]]]) -> list[list[int]]:
    """Each job's matching name indices, by Python's re in one child process with a time and memory limit."""
    if not jobs:
        return []
    request = json.dumps([[pattern.source, pattern.whole, names] for pattern, names in jobs])
    try:  # -I -S: the child imports nothing from the environment, only the standard library it names
        command = [sys.executable, "-I", "-S", "-c", _CHILD, str(CHILD_MEMORY), str(math.ceil(CHILD_SECONDS) + 1)]
        done = subprocess.run(command, input=request, capture_output=True, text=True, timeout=CHILD_SECONDS)
        output, failure = done.stdout, None if done.returncode == 0 else done.stderr
    except subprocess.TimeoutExpired as exc:
        output, failure = exc.stdout or "", "timeout"
    if isinstance(output, bytes):  # what a timeout leaves is bytes, even in text mode
        output = output.decode("utf-8", "replace")
    results = [json.loads(line) for line in output.split("\n")[:-1]]  # whole lines: a killed child may leave half one
    for (pattern, _), result in zip(jobs, results, strict=False):
        if isinstance(result, dict):
            raise PatternError(pattern.source, f"is not a regular expression PEFT can use ({result['error']})")
    if failure is not None:  # the pattern without a result is the one the child was matching
        raise PatternError(jobs[min(len(results), len(jobs) - 1)][0].source, f"{_exceeded(failure)}; name the modules "
                           "instead")
    return results


def _exceeded(failure: str) -> str:
    """What a child that ended without all results exceeded (``failure``: "timeout", or what it wrote to stderr)."""
    if failure == "timeout":
        return f"took longer than {CHILD_SECONDS:g} s to match"
    if "MemoryError" in failure:
        return f"needed more than {CHILD_MEMORY >> 20} MiB to match"
    return f"could not be matched ({(failure.strip().splitlines() or ['the matcher ended early'])[-1]})"


# --- Python's parse tree, written out as RE2 -----------------------------------------------------------------------

class _Unsupported(Exception):
    """A construct RE2 has no form for."""


def _rewrite(tree: Any, flags: int) -> str:
    return "".join(_node(op, av, flags) for op, av in tree)


def _node(op: Any, av: Any, flags: int) -> str:
    if op in (sre.LITERAL, sre.NOT_LITERAL, sre.ANY, sre.IN):
        return _char_class(_class_source(op, av), flags & (sre.SRE_FLAG_IGNORECASE | sre.SRE_FLAG_ASCII))
    if op in (sre.MAX_REPEAT, sre.MIN_REPEAT):  # greedy or lazy: the same names match whole
        low, high, body = av
        count = f"{{{low},}}" if high == sre.MAXREPEAT else f"{{{low},{high}}}"
        return f"(?:{_rewrite(body, flags)}){count}"
    if op is sre.SUBPATTERN:
        _, add, remove, body = av
        return f"(?:{_rewrite(body, (flags | add) & ~remove)})"
    if op is sre.BRANCH:
        return "(?:" + "|".join(_rewrite(body, flags) for body in av[1]) + ")"
    if op is sre.AT:  # a printable name has no line break: "^" and "$" are its ends whatever MULTILINE says
        anchors = {sre.AT_BEGINNING: r"\A", sre.AT_BEGINNING_STRING: r"\A", sre.AT_END: r"\z",
                   sre.AT_END_STRING: r"\z", sre.AT_BOUNDARY: r"\b", sre.AT_NON_BOUNDARY: r"\B"}
        if av in anchors:  # ASCII word boundaries: Python's on an ASCII name
            return anchors[av]
    raise _Unsupported(op)  # backreferences, lookarounds, atomic groups, possessive repeats, conditionals


_CATEGORIES = {sre.CATEGORY_DIGIT: r"\d", sre.CATEGORY_NOT_DIGIT: r"\D", sre.CATEGORY_SPACE: r"\s",
               sre.CATEGORY_NOT_SPACE: r"\S", sre.CATEGORY_WORD: r"\w", sre.CATEGORY_NOT_WORD: r"\W"}


def _class_source(op: Any, av: Any) -> str:
    """A Python character class matching what the single-character node matches among printable ASCII and the
    characters case-folding to it; a range is cut down to those, so compiling the class costs little."""
    if op is sre.ANY:
        return "[^\\n]"
    if op is not sre.IN:
        return f"[{'^' if op is sre.NOT_LITERAL else ''}\\U{av:08x}]"
    negate, parts = "", []
    for kind, value in av:
        if kind is sre.NEGATE:
            negate = "^"
        elif kind is sre.LITERAL:
            parts.append(f"\\U{value:08x}")
        elif kind is sre.RANGE:
            low, high = value
            parts += [f"\\U{c:08x}" for c in (*range(max(low, 0x20), min(high, 0x7E) + 1), *_FOLDS_TO_PRINTABLE)
                      if low <= c <= high]
        elif kind is sre.CATEGORY:
            parts.append(_CATEGORIES[value])
        else:
            raise _Unsupported(kind)
    return f"[{negate}{''.join(parts)}]" if parts else "[^\\x00-\\U0010ffff]" if not negate else "[\\x00-\\U0010ffff]"


@functools.lru_cache(maxsize=4096)
def _char_class(source: str, flags: int) -> str:
    """The RE2 class of the printable ASCII characters Python's class ``source`` matches under ``flags``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        test = re.compile(source, flags).fullmatch  # one character at a time: nothing to backtrack
    codes = [ord(c) for c in _PRINTABLE if test(c)]
    if not codes:
        return r"[^\x00-\x{10FFFF}]"
    runs, start = [], codes[0]
    for previous, code in zip(codes, [*codes[1:], None], strict=True):
        if code != previous + 1:
            runs.append(f"\\x{start:02x}" if start == previous else f"\\x{start:02x}-\\x{previous:02x}")
            start = code
    return f"[{''.join(runs)}]"
