"""What voxphone sends back to Asterisk, sans I/O: AudioSocket frames and chan_websocket commands.

AudioSocket (asterisk/documentation ``Channel-Drivers/AudioSocket.md``; asterisk/asterisk
``res/res_audiosocket.c``): a frame is 1 type byte, a 2-byte big-endian length and the payload.
Asterisk reads back only audio and hang-up frames — anything else "refer to protocol
specification" ends the call — so the app sends signed-linear audio (type ``0x10``, 8 kHz,
little-endian; ``0x11``–``0x18`` for the higher rates of asterisk/asterisk PR #1492, the type the
call arrived with) paced at 20 ms, and ``0x00`` to hang up. It has no DTMF or flush from the app.

chan_websocket (asterisk/documentation ``Channel-Drivers/WebSocket.md``; asterisk/asterisk
``channels/chan_websocket.c``, ``handle_command``): BINARY frames are media in the channel's
format, which Asterisk re-frames and re-times itself (at most 65 500 bytes a message, about
1000 queued frames before it drops); TEXT commands are case-sensitive words — ``HANGUP``,
``FLUSH_MEDIA`` (drop what is queued), ``MARK_MEDIA <id>`` (answered ``MEDIA_MARK_PROCESSED
<id>`` when the media before it has been sent to the core) — or, when the channel speaks JSON
(its ``MEDIA_START`` was JSON), ``{"command": "HANGUP"}`` with ``correlation_id`` for the id.
In passthrough mode (Opus) only media and ``HANGUP`` apply. There is no DTMF from the app.
"""

from __future__ import annotations

import json
import struct

import numpy as np

from voxphone.audio.codecs import Pcm

#: The hang-up frame type.
HANGUP = 0x00
#: AudioSocket audio frame type for each sample rate (``asterisk.AUDIO_TYPES`` the other way;
#: not imported from there, which imports this module).
AUDIO_TYPE_OF_RATE = {8000: 0x10, 12000: 0x11, 16000: 0x12, 24000: 0x13, 32000: 0x14,
                      44100: 0x15, 48000: 0x16, 96000: 0x17, 192000: 0x18}  # fmt: skip


def audiosocket_frame(kind: int, payload: bytes) -> bytes:
    """One frame: ``kind``, the payload's length (big-endian) and the payload."""
    return struct.pack("!BH", kind, len(payload)) + payload


def audiosocket_audio(pcm: Pcm, rate: int) -> bytes:
    """An audio frame of ``pcm`` (int16 mono at ``rate``) as slin little-endian."""
    return audiosocket_frame(AUDIO_TYPE_OF_RATE[rate], np.asarray(pcm, "<i2").tobytes())


def audiosocket_hangup() -> bytes:
    """``0x00`` with no payload: Asterisk hangs the channel up (``*kind == ..._HANGUP``)."""
    return audiosocket_frame(HANGUP, b"")


#: The largest BINARY message chan_websocket takes; a bigger one closes the call.
WS_MAX_MESSAGE = 65_500


def ws_command(command: str, json_style: bool, correlation_id: str | None = None) -> str:
    """A chan_websocket TEXT command, in the control format the channel uses."""
    if json_style:
        body = {"command": command}
        if correlation_id is not None:
            body["correlation_id"] = correlation_id
        return json.dumps(body, separators=(",", ":"))
    return command if correlation_id is None else f"{command} {correlation_id}"
