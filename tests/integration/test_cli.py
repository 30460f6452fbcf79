"""The `voxphone` command as a user runs it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import Speech, free_tcp_port, free_udp_range, overlap
from voxphone.audio.files import read_audio

pytestmark = pytest.mark.integration


def voxphone(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "voxphone", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("telephony", [False, True])
def test_transcribe_prints_the_words(speech: dict[str, Speech], telephony: bool) -> None:
    s = speech["order"]
    r = voxphone("transcribe", str(s.path), *(["--telephony"] if telephony else []))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines and all(line.startswith("[00:") for line in lines)
    heard = " ".join(line.split("] ", 1)[1] for line in lines)
    assert overlap(s.text, heard) >= 0.6, heard


def test_transcribe_json_lines_are_events(speech: dict[str, Speech]) -> None:
    r = voxphone("transcribe", "--json", str(speech["callback"].path))
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert events[0]["type"] == "call.started" and events[0]["data"]["transport"] == "file"
    assert events[-1]["type"] == "call.ended" and events[-1]["data"]["reason"] == "end_of_file"
    durable = [e for e in events if e["type"] != "transcript.delta"]
    assert [e["seq"] for e in durable] == list(range(len(durable)))


def test_a_reader_that_goes_away_is_no_traceback(speech: dict[str, Speech]) -> None:
    """`voxphone transcribe --json FILE | head -1`: the pipe closes before voxphone is done."""
    reader, writer = os.pipe()
    os.close(reader)  # the reader is gone before the first event is written
    try:
        r = subprocess.run(
            [sys.executable, "-m", "voxphone", "transcribe", "--json", str(speech["callback"].path)],
            stdout=writer, stderr=subprocess.PIPE, text=True, timeout=120,
        )  # fmt: skip
    finally:
        os.close(writer)
    assert r.returncode == 141, r.stderr
    assert "Traceback" not in r.stderr and "BrokenPipeError" not in r.stderr, r.stderr


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["serve", "--max-calls", "x"], "voxphone serve: error: argument --max-calls: invalid int "
         "value: 'x' (see `voxphone serve --help`)"),
        (["call"], "voxphone call: error: the following arguments are required: file "
         "(see `voxphone call --help`)"),
        ([], "voxphone: error: the following arguments are required: COMMAND "
         "(see `voxphone --help`)"),
    ],
)  # fmt: skip
def test_a_usage_mistake_is_one_line(args: list[str], line: str) -> None:
    r = voxphone(*args)
    assert r.returncode == 2 and r.stderr.splitlines() == [line], r.stderr


def test_help_explains_every_serve_flag() -> None:
    r = voxphone("serve", "--help")
    assert r.returncode == 0
    for flag in [
        "--config",
        "--http-port",
        "--rtp-ports",
        "--webhook",
        "--webhook-secret",
        "--engine",
        "--audiosocket-port",
        "--event-loop",
    ]:
        assert flag in r.stdout


def test_bad_flag_value_names_the_key() -> None:
    r = voxphone("serve", "--rtp-ports", "9-1")
    assert r.returncode == 2
    assert "rtp.ports" in r.stderr and "Traceback" not in r.stderr


def test_gpu_engine_without_a_gpu_is_a_clear_error(speech: dict[str, Speech]) -> None:
    r = voxphone("transcribe", "--engine", "vllm", str(speech["order"].path))
    assert r.returncode == 2
    assert "voxphone: error: engine 'vllm' needs a CUDA GPU and NVML sees none" in r.stderr


def test_auto_engine_explains_its_choice(speech: dict[str, Speech]) -> None:
    r = voxphone("transcribe", "--log-level", "info", str(speech["order"].path))
    assert r.returncode == 0
    assert "engine_auto" in r.stderr and "sphinx" in r.stderr and "no CUDA GPU visible" in r.stderr


def test_ctrl_c_ends_a_transcription_with_the_words_so_far(
    speech: dict[str, Speech], tmp_path: Path
) -> None:
    """Ctrl-C signals the terminal's whole process group, the sphinx workers too: the open
    segment still comes out, as in a server's drain, and the exit status says "interrupted"."""
    pcm = read_audio(speech["order"].path, 16000)
    gap = np.zeros(3200, np.int16)
    long = tmp_path / "long.wav"
    with wave.open(str(long), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(np.concatenate([pcm, gap] * 10).tobytes())
    proc = subprocess.Popen(
        [sys.executable, "-m", "voxphone", "transcribe", "--json", str(long)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:  # until the first words, mid-file
        lines.append(line)
        if json.loads(line)["type"] == "transcript.delta":
            break
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    events = [json.loads(line) for line in lines + out.splitlines()]
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert [e["type"] for e in events if e["type"] == "engine.error"] == []
    ended = events[-1]
    assert ended["type"] == "call.ended" and ended["data"]["reason"] == "shutdown"
    assert ended["data"]["audio_ms"] < pcm.size * 10 // 16  # it stopped early
    finals = [e["data"]["text"] for e in events if e["type"] == "transcript.final"]
    assert finals and ended["data"]["transcript"] == " ".join(finals)


@pytest.mark.parametrize(
    ("to", "message"),
    [
        (
            "127.0.0.1:99999",
            "--to: port 99999 is out of range: use 1-65534 (RTCP goes to port + 1)",
        ),
        ("127.0.0.1", "--to must be HOST:PORT, got '127.0.0.1'"),
    ],
)
def test_call_refuses_a_bad_destination(speech: dict[str, Speech], to: str, message: str) -> None:
    r = voxphone("call", str(speech["order"].path), "--to", to)
    assert (r.returncode, r.stderr.strip()) == (2, f"voxphone: error: {message}")


def test_call_to_a_port_where_nothing_listens_fails(speech: dict[str, Speech]) -> None:
    """RTP is UDP, but the ICMP port unreachable that comes back is reported, not success."""
    port = free_udp_range(2)[0]
    r = voxphone("call", str(speech["order"].path), "--to", f"127.0.0.1:{port}", "--no-pace")
    assert r.returncode == 2 and r.stdout == ""
    assert f"voxphone: error: nothing listens at 127.0.0.1:{port}" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    ("args", "env", "first_line"),
    [
        (["--http-port", "99999"], {}, "--http-port: http.port: Input should be less than"),
        ([], {"VOXPHONE_RTP__INACTIVITY_TIMEOUT_S": "0"}, "VOXPHONE_RTP__INACTIVITY_TIMEOUT_S: "),
        (["--webhook-secret", "abc"], {}, "--webhook-secret: webhook.secret: webhook secret is "),
    ],
)
def test_serve_blames_the_flag_or_variable_not_the_file(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    env: dict[str, str],
    first_line: str,
) -> None:
    config = tmp_path / "my.toml"
    config.write_text("[rtp]\ninactivity_timeout_s = 3\n")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    r = voxphone("serve", "--config", str(config), *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    (line,) = r.stderr.splitlines()
    assert line.startswith(f"voxphone: error: {first_line}"), line
    assert "my.toml" not in line


@pytest.mark.parametrize("command", ["transcribe", "call", "whip"])
@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "No such file or directory"),
        (b"", "empty file"),
        (b"not audio", "cannot read audio: Invalid data found when processing input"),
    ],
    ids=["missing", "empty", "not-audio"],
)
def test_a_file_that_is_no_audio_is_one_line(
    tmp_path: Path, command: str, content: bytes | None, message: str
) -> None:
    path = tmp_path / "speech.wav"
    if content is not None:
        path.write_bytes(content)
    url = ["--url", f"http://127.0.0.1:{free_tcp_port()}/v1/whip"] if command == "whip" else []
    r = voxphone(command, str(path), *url)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"voxphone: error: {path}: ") and message in r.stderr, r.stderr
    assert "Errno" not in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    assert len(r.stderr.splitlines()) == 1


def test_whip_to_a_server_that_is_not_running(speech: dict[str, Speech]) -> None:
    url = f"http://127.0.0.1:{free_tcp_port()}/v1/whip"
    r = voxphone("whip", str(speech["order"].path), "--url", url)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert r.stderr == (
        f"voxphone: error: cannot reach the WHIP endpoint {url}: Connection refused; "
        "is voxphone serve running there?\n"
    )


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["whip", "--url", "notaurl"],
         "--url: 'notaurl' is not an http(s) URL; e.g. http://127.0.0.1:8080/v1/whip"),
        (["call", "--to", "no-such-host.invalid:4000"],  # the resolver's words vary
         "cannot send RTP to no-such-host.invalid:4000: "),
    ],
)  # fmt: skip
def test_a_bad_destination_is_named_before_anything_is_sent(
    speech: dict[str, Speech], args: list[str], line: str
) -> None:
    command, *rest = args
    r = voxphone(command, str(speech["order"].path), *rest)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert r.stderr.startswith(f"voxphone: error: {line}") and r.stdout == "", r.stderr


@pytest.mark.parametrize("kind", ["http", "rtp", "audiosocket"])
def test_serve_on_a_port_in_use_says_so_in_one_line(kind: str) -> None:
    http_port, (lo, hi), audiosocket_port = free_tcp_port(), free_udp_range(2), free_tcp_port()
    family, port = {
        "http": (socket.SOCK_STREAM, http_port),
        "rtp": (socket.SOCK_DGRAM, lo),
        "audiosocket": (socket.SOCK_STREAM, audiosocket_port),
    }[kind]
    with socket.socket(socket.AF_INET, family) as holder:
        holder.bind(("127.0.0.1", port))
        if family == socket.SOCK_STREAM:
            holder.listen()
        r = voxphone(
            "serve", "--http-port", str(http_port), "--rtp-ports", f"{lo}-{hi}",
            "--audiosocket-port", str(audiosocket_port), "--engine", "sphinx",
            "--log-level", "error",
        )  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    (line,) = r.stderr.splitlines()
    what = {
        "http": f"listen for HTTP on 127.0.0.1:{port}",
        "rtp": f"bind RTP port 127.0.0.1:{port}",
        "audiosocket": f"listen for AudioSocket on 127.0.0.1:{port}",
    }[kind]
    assert line.startswith(f"voxphone: error: cannot {what}: Address already in use; "), line
    assert line.endswith("or stop what holds it"), line


def test_serve_refuses_to_listen_beyond_loopback_without_a_token(tmp_path: Path) -> None:
    """One line saying why, and how to fix it; nothing listens."""
    port = free_tcp_port()
    r = voxphone("serve", "--http-host", "0.0.0.0", "--http-port", str(port), timeout=60)
    assert r.returncode == 2
    assert r.stderr.startswith("voxphone: error: http.host 0.0.0.0 listens beyond loopback")
    assert "http.token" in r.stderr and "allow_unauthenticated" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_check_config_prints_the_effective_config_with_secrets_masked(tmp_path: Path) -> None:
    toml = tmp_path / "voxphone.toml"
    toml.write_text(
        '[http]\ntoken = "s3cret-token"\n[webhook]\nurl = "https://hooks.example.com/x"\n'
        '[nats]\nurl = "nats://app:hunter2@nats.example.com:4222"\n'
        '[[webhooks]]\nname = "crm"\nurl = "https://crm.example.com/h"\n'
        'secrets = ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]\n'
    )
    r = voxphone("check-config", str(toml), timeout=60)
    assert r.returncode == 0, r.stderr
    config = json.loads(r.stdout)
    assert config["http"]["token"] == "***" and config["webhooks"][0]["secrets"] == ["***"]
    assert config["nats"]["url"] == "nats://app:***@nats.example.com:4222"
    assert config["asterisk"]["audiosocket_port"] == 0  # off unless configured
    assert config["calls"]["drain_s"] == 0  # VOXPHONE_CALLS__DRAIN_S (conftest) applies
    for secret in ("s3cret-token", "hunter2", "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"):
        assert secret not in r.stdout


def test_check_config_names_a_bad_key_in_one_line(tmp_path: Path) -> None:
    toml = tmp_path / "voxphone.toml"
    toml.write_text('[http]\nhost = "0.0.0.0"\n[rtp]\nports = "40100-40000"\n')
    r = voxphone("check-config", str(toml), timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith(f"voxphone: error: {toml}: rtp.ports: ")
    assert len(r.stderr.strip().splitlines()) == 1
    toml.write_text('[http]\nhost = "0.0.0.0"\n')
    r = voxphone("check-config", str(toml), timeout=60)
    assert r.returncode == 2 and "serve would refuse to start" in r.stderr
    assert r.stdout == "" and len(r.stderr.splitlines()) == 1  # the config only when it would


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["call", "{wav}", "--to", "127.0.0.1:20000", "--loss", "5"],
            "--loss: 5 is not a fraction",
        ),
        (["receive", "--secret", "nope"], "--secret: webhook secret is 3 bytes, too short; "),
        (["receive", "--port", "70000"], "--port: 70000 is not a TCP port (1-65535)"),
    ],
    ids=["loss", "receive-secret", "receive-port"],
)
def test_bad_values_are_one_line_before_anything_runs(
    speech: dict[str, Speech], args: list[str], message: str
) -> None:
    r = voxphone(*(a.format(wav=speech["order"].path) for a in args))
    assert (r.returncode, r.stdout) == (2, "")
    (line,) = r.stderr.splitlines()
    assert line.startswith(f"voxphone: error: {message}"), line


def test_receive_on_a_port_in_use_says_so_in_one_line() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        r = voxphone("receive", "--port", str(port))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    (line,) = r.stderr.splitlines()
    assert line.startswith(f"voxphone: error: cannot listen on 127.0.0.1:{port}: ")
    assert line.endswith("choose another --port")
