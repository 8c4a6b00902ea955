"""Ctrl-C and SIGTERM: stop at a step boundary, with a checkpoint, every rank at the same step.

    with interrupt.deferred():            # the engine's training loop
        ...                               # a first SIGINT/SIGTERM is only recorded
        interrupt.requested()             # -> the signal number, checked after every step

Inside the loop a first signal lets the step (and a checkpoint write in progress) finish; the engine
then agrees on stopping over all ranks (an all-reduce of the flag, so a signal seen by one worker
stops all of them after the same step), writes a checkpoint (`compute.checkpoint_on_interrupt`) and
raises `Interrupted`. A second signal stops at once: `Interrupted` is raised where the program is; a
checkpoint write in progress then removes its temporary directory, the previous checkpoint stays
the resume point. Outside the loop (model loading, export) `immediate()` (the CLI) turns either
signal into `Interrupted` at once. Schedulers and Ray send SIGTERM: it behaves as Ctrl-C.

With Ray workers the driver receives the signal: it writes `<output_dir>/.stop-request` (the signal
number), which every rank reads at each step boundary (see `Engine.steps`).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """The run was stopped by a signal; the message says where and what can be resumed."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    def __reduce__(self):  # travels from a Ray worker to the driver
        return type(self), (self.signum, str(self))

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


def name(signum: int) -> str:
    return signal.Signals(signum).name


_state: dict = {"pending": None, "deferring": False, "on_request": None}


def _handler(signum, frame) -> None:
    if _state["deferring"] and _state["pending"] is None:
        _state["pending"] = signum
        if _state["on_request"] is not None:
            _state["on_request"](signum)
        return
    again = " again" if _state["pending"] is not None else ""
    raise Interrupted(signum, f"{name(signum)}{again}: stopped at once")


@contextlib.contextmanager
def _installed():
    """Our handler for SIGINT and SIGTERM in the block (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def immediate():
    """SIGINT and SIGTERM raise `Interrupted` at once (outside a `deferred` block)."""
    with _installed():
        yield


@contextlib.contextmanager
def deferred(on_request: Callable[[int], None] | None = None):
    """A first signal is recorded (`requested()`), and `on_request(signum)` called; a second one
    raises `Interrupted` at once."""
    saved = dict(_state)
    _state.update(pending=None, deferring=True, on_request=on_request)
    try:
        with _installed():
            yield
    finally:
        _state.update(saved)


def requested() -> int | None:
    """The signal number received in the current `deferred` block, or None."""
    return _state["pending"]
