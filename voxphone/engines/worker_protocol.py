"""The wire between voxphone and its vLLM engine worker processes (sans-I/O).

One Unix-socket connection per worker carries every session placed on it. Each message is a
9-byte header — kind (u8), session id (u32), payload length (u32), network byte order — and the
payload. Audio goes as raw int16 little-endian 16 kHz mono PCM (one 80 ms frame = 2560 bytes):
no JSON and no base64, because at 256 calls this wire carries 3,200 frames a second.

voxphone → worker: ``OPEN`` (no payload), ``AUDIO`` (PCM), ``FINISH`` (no more audio: the
engine right-pads and flushes), ``ABORT`` (free the slot now).
worker → voxphone: ``STEP`` (UTF-8 text of one engine step, usually empty), ``END`` (the session
finished), ``FAIL`` (JSON ``{"message": str, "retry": bool}``).
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass

HEADER = struct.Struct("!BII")
MAX_PAYLOAD = 1 << 20  # far above one frame; a larger length means a corrupt stream


class Kind(enum.IntEnum):
    OPEN = 1
    AUDIO = 2
    FINISH = 3
    ABORT = 4
    STEP = 16
    END = 17
    FAIL = 18


@dataclass(frozen=True)
class Header:
    kind: Kind
    session: int
    length: int


def encode(kind: Kind, session: int, payload: bytes = b"") -> bytes:
    """One message: header + payload."""
    return HEADER.pack(kind, session, len(payload)) + payload


def decode_header(data: bytes) -> Header:
    """Parse a 9-byte header; ``ValueError`` for an unknown kind or an oversized payload."""
    kind, session, length = HEADER.unpack(data)
    if length > MAX_PAYLOAD:
        raise ValueError(f"worker message of {length} bytes exceeds {MAX_PAYLOAD}")
    return Header(Kind(kind), session, length)


def encode_failure(session: int, message: str, retry: bool) -> bytes:
    return encode(Kind.FAIL, session, json.dumps({"message": message, "retry": retry}).encode())


def decode_failure(payload: bytes) -> tuple[str, bool]:
    data = json.loads(payload)
    return str(data["message"]), bool(data["retry"])
