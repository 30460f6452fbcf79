"""The event loop ``voxphone serve`` runs on: uvloop's where it is installed (``auto``, the
default; uvloop is a dependency on CPython outside Windows), asyncio's own otherwise (with a
warning) or when chosen.

Why uvloop: when callers' packets arrive at independent moments, as real callers' do, most of
the loop's wake-ups find one datagram, so the loop's own cost per wake-up is the largest part of
a G.711 packet's. uvloop's loop (libuv, in C) costs less there: on the GPU host's Xeon, one core
carried 1,000 RTP calls in real time on uvloop in four runs of four, on asyncio's in one of four,
with no more CPU a packet in any 1,000-call pair (README, *The event loop*). ``auto`` follows
uvicorn's ``--loop auto``: where uvloop is not installed (PyPy, say) serve still runs.
voxphone uses only asyncio's public interfaces on the loop (aiohttp, aiortc and aioice, the RTP
readers' ``add_reader``, signal handlers, subprocesses, TLS), which uvloop implements; the
engines' workers run in processes of their own, on their own loops.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

import structlog

from voxphone.errors import ConfigError

T = TypeVar("T")
log = structlog.get_logger(__name__)

#: The loops themselves, what ``auto`` picks from: a benchmark names the one it measured.
Loop = Literal["asyncio", "uvloop"]
LOOPS: tuple[Loop, ...] = ("asyncio", "uvloop")
EventLoop = Literal["auto", Loop]
#: The choices, in the order the CLI offers them.
EVENT_LOOPS: tuple[EventLoop, ...] = ("auto", *LOOPS)


def loop_factory(kind: EventLoop) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The factory ``asyncio.Runner`` takes for ``kind``; ``None`` is asyncio's own, which
    ``auto`` gives where uvloop is not installed.

    Raises ``ConfigError`` when ``kind`` is ``uvloop`` and uvloop is not installed."""
    if kind == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if kind == "auto":
            return None
        raise ConfigError(
            'process.event_loop = "uvloop" needs the uvloop package, which is not installed: '
            "pip install uvloop, or choose asyncio"
        ) from None
    return uvloop.new_event_loop


def run(kind: EventLoop, main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on the ``kind`` of loop; ``ConfigError`` as ``loop_factory``.
    ``auto`` without uvloop warns (``event_loop_auto``): uvloop is a dependency, so its absence
    is an install to look at, or a platform to say ``asyncio`` for."""
    try:
        factory = loop_factory(kind)
    except ConfigError:
        main.close()  # never awaited: say nothing about it
        raise
    if kind == "auto" and factory is None:
        log.warning(
            "event_loop_auto", chose="asyncio",
            why='uvloop is not installed: pip install uvloop, or set event_loop = "asyncio"',
        )  # fmt: skip
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """Which kind ``loop`` is (``uvloop`` or ``asyncio``), from its class: for the ready log."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
