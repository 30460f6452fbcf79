"""pydantic's validation errors in voxphone's words, for the config and the HTTP API alike."""

from __future__ import annotations

from pydantic_core import ErrorDetails


def error_message(err: ErrorDetails) -> str:
    """pydantic's message for one error, without the ``Value error, `` it puts before what a
    validator of ours raised: that text is already the cause and the fix."""
    ctx = err.get("ctx") or {}
    if err["type"] == "value_error" and "error" in ctx:
        return str(ctx["error"])
    return err["msg"]
