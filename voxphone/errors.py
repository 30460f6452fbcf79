"""The one exception tree of voxphone.

    VoxphoneError
     ├── ConfigError      bad config file, flag or environment override (names the key)
     ├── TransportError   malformed or unwanted input on the wire (RTP, SDP, websocket frames)
     ├── DecodeError      a payload the codec could not turn into PCM
     ├── EngineError      the speech engine failed to start or to serve a stream
     ├── DeliveryError    an event could not be delivered to a sink
     └── PlaybackError    bot audio could not be played into a call (ended, no endpoint, no DTMF)

Foreign exceptions are translated at the boundary where they enter (``raise X(...) from exc``) so
callers catch one family, and every message says what was wrong and where.
"""

from __future__ import annotations

import os


class VoxphoneError(Exception):
    """Root of every error voxphone raises on purpose."""


class ConfigError(VoxphoneError):
    """The configuration is invalid; the message names the offending key."""


class TransportError(VoxphoneError):
    """Input from a transport was malformed or not acceptable."""


class DecodeError(VoxphoneError):
    """A media payload could not be decoded."""


class EngineError(VoxphoneError):
    """The speech engine failed."""


class DeliveryError(VoxphoneError):
    """An event could not be delivered."""


class PlaybackError(VoxphoneError):
    """Audio, a mark or DTMF could not be sent into a call: it has ended, its transport has no
    way back (no endpoint) or cannot do what was asked (DTMF), or the input was unusable."""


def cannot_listen(what: str, where: str, exc: OSError, fix: str) -> TransportError:
    """The error for a listening socket the OS refused (``what``: "HTTP", "AudioSocket"; ``where``:
    ``host:port``): the OS's own short words for ``exc.errno`` — asyncio's ``start_server``
    re-raises with a long message that repeats the address — then ``fix``."""
    why = os.strerror(exc.errno) if exc.errno else str(exc)
    return TransportError(f"cannot listen for {what} on {where}: {why}; {fix}")
