"""Work on untrusted input in a child process, bounded in time: whatever the input makes it do (a parser that holds
the interpreter for seconds, a read that blocks, a crash in C), the caller can stop waiting for it, and it is killed.

Children are forked from a forkserver that has imported the work's module once, so starting one costs milliseconds
and inherits none of the caller's threads, locks or open database connections. As with any multiprocessing start
method but fork, the program must be importable again: run as a module (`python -m`) or a script whose work is
under ``if __name__ == "__main__"``.
"""

from __future__ import annotations

import multiprocessing
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any


class TookTooLong(Exception):
    """The work did not finish within its time; its child was killed."""


class Failed(Exception):
    """The work raised (the message says its type and message) or its child died."""


def _run(function: Callable[..., Any], args: tuple[Any, ...], send: Connection) -> None:
    try:
        send.send((True, function(*args)))
    except BaseException as exc:  # the parent says why the input failed
        send.send((False, f"{type(exc).__name__}: {exc}"))


def run_isolated(function: Callable[..., Any], args: tuple[Any, ...], tick: Callable[[], None], seconds: float,
                 every: float = 0.25) -> Any:
    """``function(*args)`` (a module-level function; it and its result must pickle) in a child process, while this
    thread calls ``tick()`` about every ``every`` seconds (it may raise to stop waiting). :class:`TookTooLong` after
    ``seconds``, :class:`Failed` if the function raised or the child died. The child never outlives the call."""
    context = multiprocessing.get_context("forkserver")
    # Honoured when the forkserver starts (the first time): the work's module, and its package as far as the program
    # has imported it. multiprocessing runs the program's main script again in every child (as __mp_main__); with
    # the imports it makes (the CLI's, for the `mergeops` script) done once in the server, a child starts in ms.
    package = function.__module__.partition(".")[0]
    context.set_forkserver_preload(sorted({function.__module__} | {
        name for name in sys.modules if name.partition(".")[0] == package}))
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_run, args=(function, args, send), name="mergeops-isolated", daemon=True)
    deadline = time.monotonic() + seconds
    child.start()
    send.close()
    try:
        while not receive.poll(max(min(every, deadline - time.monotonic()), 0.0)):
            if not child.is_alive() and not receive.poll():
                raise Failed(f"its reader died (exit code {child.exitcode})")
            tick()
            if time.monotonic() >= deadline:
                raise TookTooLong(f"it took longer than {seconds:g} s")
        try:
            ok, value = receive.recv()
        except EOFError:  # died after it was polled
            raise Failed(f"its reader died (exit code {child.exitcode})") from None
    finally:
        if child.is_alive():
            child.kill()
        child.join()
        receive.close()
    if not ok:
        raise Failed(value)
    return value
