"""The ``voxphone`` command: serve, transcribe a file, or place a test call."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import sys
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from voxphone import __version__, event_loop
from voxphone.config import ENV_PREFIX, Config, check_secret, load_config
from voxphone.errors import ConfigError, TransportError, VoxphoneError
from voxphone.event_loop import EVENT_LOOPS

if TYPE_CHECKING:
    from voxphone.recorder import RtpRecorder
    from voxphone.transports.rtp_packet import RtpPacket

DESCRIPTION = """\
Phone and browser calls in, live transcript events out.

  voxphone serve                      run the service (RTP on 127.0.0.1:40000-40100, HTTP on :8080)
  voxphone call speech.wav            send a file as a phone call (G.711 RTP) to a running service
  voxphone whip speech.wav            send a file as a browser call (WebRTC, WHIP) and print events
  voxphone transcribe speech.wav      print a file's transcript through the same call pipeline
  voxphone receive                    print the webhooks a service sends (to try it out)
"""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.run(args)
        return result
    except VoxphoneError as exc:
        print(f"voxphone: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`voxphone transcribe --json | head`): nothing more to say. Point
        # stdout at /dev/null so the interpreter's last flush cannot fail too (Python's docs,
        # "Note on SIGPIPE"); 141 = 128 + SIGPIPE, what a shell reports for such a program.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake in one line (the ground rule for every error) that says
    where the help is, instead of argparse's usage block followed by the error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="voxphone",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"voxphone {__version__}")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="run the service",
        description="Run the service until SIGINT/SIGTERM, then drain: /ready answers 503, "
        "new calls are refused, live calls go on until they end or calls.drain_s (30 s) "
        "passes, then end with `shutdown`. A second signal ends at once.",
    )
    _config_flags(serve)
    g = serve.add_argument_group("overrides (each beats the config file and VOXPHONE_* variables)")
    g.add_argument("--http-host", help="HTTP listen address [127.0.0.1]")
    g.add_argument("--http-port", type=int, help="HTTP port for health, readiness, API [8080]")
    g.add_argument("--rtp-host", help="RTP listen address; 0.0.0.0 for remote gateways [127.0.0.1]")
    g.add_argument("--rtp-ports", metavar="LOW-HIGH", help="RTP port range [40000-40100]")
    g.add_argument("--webhook", metavar="URL", help="POST every event here as JSON")
    g.add_argument("--webhook-secret", metavar="whsec_…", help="sign webhooks (Standard Webhooks)")
    g.add_argument("--max-calls", type=int, help="concurrent call limit [50]")
    g.add_argument(
        "--audiosocket-port", type=int, metavar="PORT", help="Asterisk AudioSocket port [0: off]"
    )
    g.add_argument(
        "--event-loop",
        choices=EVENT_LOOPS,
        help="auto: uvloop's where installed, else asyncio's (warned); asyncio; uvloop [auto]",
    )
    serve.set_defaults(run=_serve)

    check = sub.add_parser(
        "check-config",
        help="validate a config file and print the effective config",
        description="Validate FILE (with VOXPHONE_* variables applied, as serve would) and "
        "print the effective config as JSON, secrets masked; exit 2 with the bad keys if invalid.",
    )
    check.add_argument("file", type=Path, metavar="FILE")
    check.set_defaults(run=_check_config)

    tr = sub.add_parser(
        "transcribe",
        help="transcribe an audio file",
        description="Transcribe any file FFmpeg can read, through the same call "
        "pipeline a live call uses, and print each segment as it closes.",
    )
    tr.add_argument("file", type=Path)
    tr.add_argument(
        "--telephony",
        action="store_true",
        help="send the audio through the phone path first (8 kHz G.711 µ-law), "
        "to hear what a phone line does to accuracy",
    )
    tr.add_argument("--json", action="store_true", help="print every event as a JSON line")
    _config_flags(tr)
    tr.set_defaults(run=_transcribe)

    call = sub.add_parser(
        "call",
        help="send a file as an RTP call to a running service",
        description="A test caller: sends the file as G.711 RTP at real-time "
        "pace, like a SIP gateway would.",
    )
    call.add_argument("file", type=Path)
    call.add_argument(
        "--to",
        default="127.0.0.1:40000",
        metavar="HOST:PORT",
        help="where voxphone listens for RTP [127.0.0.1:40000]",
    )
    call.add_argument("--codec", choices=["pcmu", "pcma"], default="pcmu", help="[pcmu]")
    call.add_argument("--ptime", type=int, default=20, help="milliseconds per packet [20]")
    call.add_argument("--loss", type=float, default=0.0, help="fraction of packets to drop [0]")
    call.add_argument("--no-pace", action="store_true", help="send as fast as possible")
    call.add_argument(
        "--dtmf",
        metavar="DIGITS",
        default="",
        help="key presses to send after the audio (RFC 4733, payload type 101)",
    )
    call.add_argument(
        "--record",
        metavar="FILE",
        type=Path,
        help="write what the service sends back (bot audio) to this WAV file",
    )
    call.add_argument(
        "--hold",
        metavar="SECONDS",
        type=float,
        default=0.0,
        help="stay on the line this long after the file, sending silence (to hear a reply) [0]",
    )
    call.set_defaults(run=_call)

    whip = sub.add_parser(
        "whip",
        help="send a file as a WebRTC call to a running service",
        description="Play a file into voxphone's WHIP endpoint as a browser would (aiortc), "
        "hang up when it has played, and print the events the data channel brings back.",
    )
    whip.add_argument("file", type=Path)
    whip.add_argument("--url", default="http://127.0.0.1:8080/v1/whip", help="[%(default)s]")
    whip.add_argument("--codec", choices=["opus", "pcmu", "pcma", "g722"], default="opus")
    whip.add_argument("--token", help="the service's http.token, if it has one")
    whip.add_argument(
        "--record",
        metavar="FILE",
        type=Path,
        help="offer sendrecv and write what the service sends back (bot audio) to this WAV",
    )
    whip.add_argument(
        "--hold",
        metavar="SECONDS",
        type=float,
        default=0.0,
        help="stay on the line this long after the file, sending silence [0]",
    )
    whip.set_defaults(run=_whip)

    rx = sub.add_parser(
        "receive",
        help="print incoming webhooks (a receiver for trying it out)",
        description="Listen for voxphone's webhooks, verify their signatures when "
        "given the secret, and print each event as a JSON line.",
    )
    rx.add_argument("--host", default="127.0.0.1", help="[127.0.0.1]")
    rx.add_argument("--port", type=int, default=9000, help="[9000]")
    rx.add_argument("--secret", metavar="whsec_…", help="verify signatures with this secret")
    rx.set_defaults(run=_receive)
    return parser


def _config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, metavar="FILE", help="TOML config file (see configs/)")
    p.add_argument(
        "--engine",
        choices=["auto", "sphinx", "vllm", "vllm-remote"],
        help="speech engine; auto picks the best available [auto]",
    )
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", choices=["auto", "json", "console"])


#: The flag behind each config key a flag sets, so a bad value is blamed on the flag.
FLAGS = {
    "engine.kind": "--engine",
    "log.level": "--log-level",
    "log.format": "--log-format",
    "http.host": "--http-host",
    "http.port": "--http-port",
    "rtp.host": "--rtp-host",
    "rtp.ports": "--rtp-ports",
    "webhook.url": "--webhook",
    "webhook.secret": "--webhook-secret",
    "calls.max_concurrent": "--max-calls",
    "asterisk.audiosocket_port": "--audiosocket-port",
    "process.event_loop": "--event-loop",
}


def _load(args: argparse.Namespace, extra: dict[str, Any] | None = None) -> Config:
    overrides = {
        "engine.kind": args.engine,
        "log.level": args.log_level,
        "log.format": args.log_format,
        **(extra or {}),
    }
    config = load_config(args.config, overrides, flags=FLAGS)
    from voxphone.logging import configure

    configure(config.log.level, config.log.format)
    return config


def _serve(args: argparse.Namespace) -> int:
    from voxphone.app import serve

    config = _load(
        args,
        {
            "http.host": args.http_host,
            "http.port": args.http_port,
            "rtp.host": args.rtp_host,
            "rtp.ports": args.rtp_ports,
            "webhook.url": args.webhook,
            "webhook.secret": args.webhook_secret,
            "calls.max_concurrent": args.max_calls,
            "asterisk.audiosocket_port": args.audiosocket_port,
            "process.event_loop": args.event_loop,
        },
    )
    _check_loop(config, args.event_loop is not None, args.config)
    event_loop.run(config.process.event_loop, serve(config))
    return 0


def _check_config(args: argparse.Namespace) -> int:
    config = load_config(args.file)
    if (why := config.http.exposure_error()) is not None:
        raise ConfigError(f"{args.file}: serve would refuse to start: {why}")
    _check_loop(config, False, args.file)
    print(json.dumps(masked(config.model_dump(mode="json")), indent=2))
    return 0


def _check_loop(config: Config, flag: bool, path: Path | None) -> None:
    """``ConfigError`` when the event loop chosen is not installed, naming where it was chosen
    (the flag, the variable, or else the file ``path``), as other config errors do."""
    try:
        event_loop.loop_factory(config.process.event_loop)
    except ConfigError as exc:
        variable = f"{ENV_PREFIX}PROCESS__EVENT_LOOP"
        source = "--event-loop" if flag else variable if variable in os.environ else path
        raise ConfigError(f"{source}: {exc}") from None


def _transcribe(args: argparse.Namespace) -> int:
    from voxphone.app import create_engine
    from voxphone.transcribe import transcribe_file

    config = _load(args, {"log.level": args.log_level or "warning"})
    ended = asyncio.run(
        transcribe_file(
            lambda: create_engine(config),
            args.file,
            telephony=args.telephony,
            json_lines=args.json,
            progress=sys.stderr.isatty(),
        )
    )
    if ended is None:
        return 1
    return 130 if ended.data["reason"] == "shutdown" else 0  # 130: interrupted, as shells say


def _call(args: argparse.Namespace) -> int:
    import numpy as np

    from voxphone.audio.codecs import codec_by_name
    from voxphone.audio.files import read_audio
    from voxphone.recorder import RtpRecorder
    from voxphone.testing import dtmf_packets, rtp_packets
    from voxphone.transports.dtmf import DTMF_KEYS

    host, port = _host_port(args.to)
    try:  # before anything is said about the call: a name that does not resolve is the error
        socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise TransportError(f"cannot send RTP to {args.to}: {exc.strerror}") from None
    if not 0 <= args.loss < 1:
        raise ConfigError(f"--loss: {args.loss:g} is not a fraction from 0 to 1 (0.05 drops 5 %)")
    if bad := set(args.dtmf.upper()) - set(DTMF_KEYS):
        raise ConfigError(f"--dtmf: not DTMF keys: {''.join(sorted(bad))}")
    if not 0 <= args.hold <= 3600:
        raise ConfigError(f"--hold: {args.hold:g} s is not from 0 to 3600")
    if args.record is not None and not args.record.parent.is_dir():
        raise ConfigError(f"--record: folder {args.record.parent} does not exist")
    codec = codec_by_name(args.codec)
    pcm = read_audio(args.file, codec.sample_rate)
    pcm = np.concatenate([pcm, np.zeros(int(args.hold * codec.sample_rate), np.int16)])
    packets: list[RtpPacket | None] = list(rtp_packets(pcm, codec, ptime_ms=args.ptime))
    if args.dtmf:
        last = packets[-1]
        assert last is not None
        packets += dtmf_packets(args.dtmf, last, ptime_ms=args.ptime)
    seconds = len(packets) * args.ptime / 1000
    print(
        f"calling {host}:{port}: {len(packets)} {codec.name} packets, {seconds:.1f} s",
        file=sys.stderr,
    )
    first = next(p for p in packets if p is not None)
    recorder = RtpRecorder(codec, first.payload_type) if args.record is not None else None
    sent = asyncio.run(_send_call(packets, host, port, args, recorder))
    report: dict[str, Any] = {
        "to": args.to, "codec": codec.name, "packets_sent": sent, "seconds": seconds
    }  # fmt: skip
    if recorder is not None:
        report["recorded"] = {
            "file": str(args.record),
            "packets": recorder.packets,
            "seconds": round(recorder.write_wav(args.record), 3),
            "dtmf": recorder.digits,
            **({"dropped": recorder.dropped} if recorder.dropped else {}),
        }
    print(json.dumps(report))
    return 0


async def _listen(sock: socket.socket, recorder: RtpRecorder) -> None:
    """Every datagram the service sends back, until cancelled."""
    loop = asyncio.get_running_loop()
    while True:
        recorder.add(await loop.sock_recv(sock, 2048))


def _host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` → ``(host, port)``; ``ConfigError`` naming ``--to`` otherwise."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdecimal():
        raise ConfigError(f"--to must be HOST:PORT, got {text!r}")
    if not 1 <= int(port) <= 65534:
        raise ConfigError(f"--to: port {port} is out of range: use 1-65534 (RTCP goes to port + 1)")
    return host, int(port)


async def _send_call(
    packets: list[RtpPacket | None],
    host: str,
    port: int,
    args: argparse.Namespace,
    recorder: RtpRecorder | None = None,
) -> int:
    """Send the call from one connected UDP socket, then hang up as a gateway does: RTCP BYE to
    the RTCP port (RTP port + 1), from the RTP source (the one voxphone latched onto). What
    comes back to that socket (symmetric RTP) goes to ``recorder``.

    UDP confirms nothing, but a connected socket reports an ICMP port unreachable as
    ``ConnectionRefusedError`` on a later send: nothing listens there."""
    from voxphone.testing import send_rtp
    from voxphone.transports.rtcp import bye

    first = next(p for p in packets if p is not None)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect((host, port))
            sock.setblocking(False)
            listening = None
            if recorder is not None:
                listening = asyncio.create_task(_listen(sock, recorder))
            try:
                sent = await send_rtp(
                    packets, (host, port), ptime_ms=args.ptime, loss=args.loss,
                    pace=not args.no_pace, sock=sock,
                )  # fmt: skip
            finally:
                if listening is not None:
                    listening.cancel()
                    (heard,) = await asyncio.gather(listening, return_exceptions=True)
                    if isinstance(heard, ConnectionRefusedError):
                        raise heard  # the ICMP error reached the receiving side first
            sock.connect((host, port + 1))  # the same local port: the RTCP port, from the source
            sock.send(bye(first.ssrc, "hangup"))
    except ConnectionRefusedError:
        raise TransportError(
            f"nothing listens at {host}:{port} (ICMP port unreachable): is voxphone serve "
            "running, and is that port in its rtp.ports range?"
        ) from None
    except OSError as exc:
        raise TransportError(f"cannot send RTP to {host}:{port}: {exc.strerror or exc}") from None
    return sent


def _whip(args: argparse.Namespace) -> int:
    from voxphone.whip_client import play

    url = urllib.parse.urlsplit(args.url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ConfigError(
            f"--url: {args.url!r} is not an http(s) URL; e.g. http://127.0.0.1:8080/v1/whip"
        )
    if not 0 <= args.hold <= 3600:
        raise ConfigError(f"--hold: {args.hold:g} s is not from 0 to 3600")
    if args.record is not None and not args.record.parent.is_dir():
        raise ConfigError(f"--record: folder {args.record.parent} does not exist")
    record = args.record is not None
    call = asyncio.run(play(args.url, args.file, args.codec, args.token, record, args.hold))
    for event in call.events:
        print(json.dumps(event))
    if call.recorder is not None:  # the last line: what was recorded
        seconds = round(call.recorder.write_wav(args.record), 3)
        recorded = {"file": str(args.record), "seconds": seconds, "dtmf": call.digits}
        print(json.dumps({"recorded": recorded}))
    return 0


def _receive(args: argparse.Namespace) -> int:
    from voxphone.receive import receive

    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port: {args.port} is not a TCP port (1-65535)")
    if args.secret:
        try:
            check_secret(args.secret)
        except ValueError as exc:
            raise ConfigError(f"--secret: {exc}") from None
    asyncio.run(receive(args.host, args.port, args.secret))
    return 0


#: Keys whose values are secrets (``check-config`` prints them masked).
SECRET_KEYS = frozenset({"token", "secret", "secrets", "auth_token", "credential", "password"})
MASK = "***"


def masked(data: Any) -> Any:
    """``data`` (a config as JSON types) with every secret value replaced by ``***`` and the
    password in any ``scheme://user:password@host`` URL too."""
    if isinstance(data, dict):
        return {k: _mask(v) if k in SECRET_KEYS else masked(v) for k, v in data.items()}
    if isinstance(data, list):
        return [masked(v) for v in data]
    if isinstance(data, str) and "://" in data and "@" in data:
        return re.sub(r"(://[^:/@]*):[^@/]*@", rf"\1:{MASK}@", data)
    return data


def _mask(value: Any) -> Any:
    if value is None or value == "":
        return value
    return [MASK for _ in value] if isinstance(value, list) else MASK
