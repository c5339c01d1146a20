"""SIGTERM and SIGINT held from a service's first moment until its event loop takes them over.

As a container's PID 1 a process ignores a signal it has no handler for, and the kubelet sends SIGTERM once: one
that came while a service imported its modules, parsed its flags or opened its ports was lost, and the pod loaded,
turned ready and ran until its grace period ended in SIGKILL. Outside a container it killed the process without a
line, where a stop during loading exits 0 with a warning. Both services call hold() first (their entry points
before their imports), take_over() as their event loop starts, and ignore() once it has closed. What is left is
the interpreter's own start-up, some 50 ms; an init process such as tini as the container's PID 1 covers that too.
"""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported only to type-check: this module loads first, before anything heavy
    import asyncio
    from collections.abc import Callable

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_held: list[int] = []  # the stop signals that came while held, in order


def _record(signum: int, frame: object) -> None:
    _held.append(signum)


def hold() -> None:
    """From now on, record SIGTERM and SIGINT instead of dying of them (main thread only)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _record)


def ignore() -> None:
    """The service has stopped: SIGTERM and SIGINT are ignored from now on (main thread only). A Python handler
    such as hold()'s would not do: the interpreter's finalization gives a signal with one its default back before
    it tears the modules down, and a second stop then (a repeated Ctrl-C, `timeout`'s or systemd's repeat) killed
    the process by that signal instead of its exit 0."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def take_over(loop: asyncio.AbstractEventLoop, stop: Callable[[], None]) -> None:
    """The event loop answers SIGTERM and SIGINT with stop() from now on; stop() at once if one came while held."""
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop)
    if _held:
        _held.clear()
        stop()
