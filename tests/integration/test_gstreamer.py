"""WebRTC clients that are not browsers: GStreamer's ``webrtcbin`` (what ``whipclientsink`` and
many embedded and media-server WHIP publishers are built on) calls `voxphone serve` over WHIP.

webrtcbin offers ``a=setup:actpass`` with an RSA DTLS certificate; answered ``active``, aiortc
was the DTLS client with ECDHE-ECDSA suites only and the handshake died with ``no shared
cipher``. Both processes run in a private network namespace (``unshare -rn``), so ICE sees
loopback only. The client is tests/integration/gst_whip_client.py under the system Python
(Debian's ``python3-gi``; scripts/test installs the GStreamer packages).
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Speech, free_tcp_port, free_udp_range, overlap, require

pytestmark = pytest.mark.integration

CLIENT = Path(__file__).with_name("gst_whip_client.py")
SYSTEM_PYTHON = "/usr/bin/python3"  # the one Debian's python3-gi belongs to


def in_namespace(port: int, wav: Path, codec: str) -> str:
    """A shell script: loopback up, `voxphone serve` in the background, the client, the end."""
    rtp = "{}-{}".format(*free_udp_range(2))
    serve = [sys.executable, "-m", "voxphone", "serve", "--http-port", str(port),
             "--rtp-ports", rtp, "--engine", "sphinx", "--log-format", "json"]  # fmt: skip
    client = [SYSTEM_PYTHON, str(CLIENT), f"http://127.0.0.1:{port}/v1/whip", str(wav), codec]
    return "\n".join([
        "ip link set lo up || exit 3",
        f"{shlex.join(serve)} 2>serve.log & server=$!",
        f"{shlex.join(client)}; status=$?",
        'kill "$server"; wait "$server"; exit $status',
    ])  # fmt: skip


async def gst_call(tmp_path: Path, wav: Path, codec: str) -> list[dict[str, Any]]:
    """The events webrtcbin's data channel received; fails with both sides' logs."""
    script = in_namespace(free_tcp_port(), wav, codec)
    env = {
        "VOXPHONE_ASTERISK__AUDIOSOCKET_PORT": "0",
        "VOXPHONE_WEBRTC__INTERFACES": '["127.0.0.1"]',
    }
    proc = await asyncio.create_subprocess_exec(
        require("unshare"), "-rn", "sh", "-c", script, cwd=tmp_path,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 150)
    log = (tmp_path / "serve.log").read_text()[-2000:] if (tmp_path / "serve.log").exists() else ""
    assert proc.returncode == 0, f"client: {err.decode()[-3000:]}\nserve: {log}"
    return [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]


@pytest.mark.parametrize("codec", ["opus", "pcmu", "pcma"])
async def test_gstreamer_webrtcbin_publishes_a_call(
    speech: dict[str, Speech], tmp_path: Path, codec: str
) -> None:
    """webrtcbin's own offer (actpass, RSA certificate) gets a passive answer: DTLS completes,
    audio is transcribed and the events come back over its data channel."""
    require(SYSTEM_PYTHON)
    events = await gst_call(tmp_path, speech["order"].path, codec)
    started, ended = events[0], events[-1]
    assert started["type"] == "call.started" and started["data"]["transport"] == "webrtc"
    assert started["data"]["codec"] == {"opus": "opus", "pcmu": "PCMU", "pcma": "PCMA"}[codec]
    assert ended["type"] == "call.ended" and ended["data"]["reason"] == "hangup"
    assert ended["data"]["audio_ms"] >= 3000  # the file is 3.6 s
    assert overlap(speech["order"].text, ended["data"]["transcript"]) >= 0.5
