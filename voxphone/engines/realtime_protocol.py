"""vLLM's ``/v1/realtime`` websocket protocol, sans I/O (vLLM 0.16–0.33).

vLLM's own protocol, OpenAI-inspired but not wire-compatible. Client: ``session.update{model}``,
``input_audio_buffer.commit`` (start), ``input_audio_buffer.append{audio: base64 PCM16 LE mono
16 kHz}``..., ``input_audio_buffer.commit{final: true}`` (end). Server: ``session.created``,
``transcription.delta{delta}`` (one per engine step, mostly empty), ``transcription.done{text,
usage}``, ``error{error, code}``. All frames are JSON text frames.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from enum import Enum
from typing import Any

from voxphone.audio.codecs import Pcm
from voxphone.errors import EngineError


def session_update(model: str) -> str:
    return json.dumps({"type": "session.update", "model": model})


def commit(final: bool = False) -> str:
    return json.dumps({"type": "input_audio_buffer.commit", "final": final})


_APPEND_HEAD = '{"type": "input_audio_buffer.append", "audio": "'


def append(pcm16k: Pcm) -> str:
    """One append of int16 mono 16 kHz audio (little-endian on the wire, whatever the host).

    Sent 12.5 times a second per call, so built by concatenation: base64's alphabet (RFC 4648
    §4) needs no JSON escaping, and this halves the cost of ``json.dumps`` (≈ 7 µs per frame;
    ``benchmarks/remote_fanout.py``)."""
    raw = pcm16k.astype("<i2", copy=False).tobytes()
    return _APPEND_HEAD + base64.b64encode(raw).decode("ascii") + '"}'


@dataclass(frozen=True)
class SessionCreated:
    id: str


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Done:
    text: str
    prompt_tokens: int | None
    completion_tokens: int | None


class ErrorAction(Enum):
    """What a client does about a server ``error``."""

    CONTINUE = "continue"  # this message was rejected; the session goes on
    RECONNECT = "reconnect"  # the session is broken; a fresh one may work
    FATAL = "fatal"  # configuration is wrong; retrying cannot help


#: vLLM's ``error.code`` values (entrypoints/.../realtime/connection.py) and our response to each.
ERROR_ACTIONS: dict[str, ErrorAction] = {
    "invalid_audio": ErrorAction.CONTINUE,  # one append could not be decoded; it was dropped
    "processing_error": ErrorAction.RECONNECT,  # generation failed: the session's request is gone
    "invalid_json": ErrorAction.RECONNECT,  # we sent something broken: start clean
    "invalid_event": ErrorAction.RECONNECT,
    "unknown_event": ErrorAction.RECONNECT,
    "model_not_found": ErrorAction.FATAL,  # engine.vllm_remote.model names no served model
    "model_not_validated": ErrorAction.FATAL,
}


@dataclass(frozen=True)
class ServerError:
    message: str
    code: str | None

    @property
    def action(self) -> ErrorAction:
        return ERROR_ACTIONS.get(self.code or "", ErrorAction.RECONNECT)


@dataclass(frozen=True)
class Unknown:
    """A server event this client does not use (newer servers add some); ignored."""

    type: str


ServerEvent = SessionCreated | Delta | Done | ServerError | Unknown


def parse(message: str | bytes) -> ServerEvent:
    """Decode one server frame; raise ``EngineError`` naming what is malformed."""
    try:
        obj = json.loads(message)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EngineError(f"realtime server sent invalid JSON: {exc}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        raise EngineError(f"realtime server event has no 'type': {str(obj)[:200]}")
    kind = obj["type"]
    if kind == "transcription.delta":
        return Delta(_str(obj, "delta"))
    if kind == "transcription.done":
        raw_usage = obj.get("usage")
        usage: dict[str, Any] = raw_usage if isinstance(raw_usage, dict) else {}
        return Done(
            _str(obj, "text"), _int(usage, "prompt_tokens"), _int(usage, "completion_tokens")
        )
    if kind == "session.created":
        return SessionCreated(str(obj.get("id", "")))
    if kind == "error":
        code = obj.get("code")
        return ServerError(_str(obj, "error"), code if isinstance(code, str) else None)
    return Unknown(kind)


def _str(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise EngineError(f"realtime {obj['type']} event: {key!r} must be a string, got {value!r}")
    return value


def _int(obj: dict[str, Any], key: str) -> int | None:
    value = obj.get(key)
    return value if isinstance(value, int) else None
