"""Config: file, environment and flag layers, and errors that name the bad key."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from voxphone.config import MAKE_SECRET, load_config
from voxphone.errors import ConfigError

ROOT = Path(__file__).parents[2]


def test_defaults_work_on_a_laptop() -> None:
    c = load_config(environ={})
    assert (c.http.host, c.http.port) == ("127.0.0.1", 8080)
    assert c.rtp.ports == (40000, 40100)
    assert c.engine.kind == "auto"
    assert c.webhook.url is None


def test_example_config_is_valid() -> None:
    c = load_config(ROOT / "configs" / "voxphone.example.toml", environ={})
    assert c.rtp.ports[0] <= c.rtp.ports[1]


def test_layers_file_then_env_then_flags(tmp_path: Path) -> None:
    f = tmp_path / "v.toml"
    f.write_text(
        '[http]\nport = 9000\n[rtp]\nports = "41000-41010"\n[webhook]\nurl = "http://a/"\n'
    )
    env = {"VOXPHONE_HTTP__PORT": "9100", "VOXPHONE_RTP__INACTIVITY_TIMEOUT_S": "2.5"}
    c = load_config(f, {"webhook.url": "http://b/", "rtp.ports": None}, environ=env)
    assert c.http.port == 9100
    assert c.rtp.ports == (41000, 41010)
    assert c.rtp.inactivity_timeout_s == 2.5
    assert c.webhook.url == "http://b/"


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[rtp]\nports = "40100-40000"\n', r"v.toml: rtp.ports: .*1 <= low <= high"),
        ('[rtp]\nports = "forty"\n', r"rtp.ports: .*expected a port range like '40000-40100'"),
        ('[http]\nport = "x"\n', r"http.port: Input should be a valid integer"),
        ("[htttp]\nport = 1\n", r"htttp: unknown key"),
        ('[engine]\nkind = "whisper"\n', r"engine.kind: Input should be 'auto', 'sphinx'"),
        ('[webhook]\nurl = "ftp://x"\n', r"webhook.url: .*must start with http"),
        ('[webhook]\nurl = "http://x"\nsecret = "whsec_***"\n', r"webhook.secret: .*not base64"),
        ("[http\n", r"v.toml: invalid TOML"),
        ('[webrtc]\nports = "9-8"\n', r"webrtc.ports: .*1 <= low <= high"),
        (
            '[webrtc]\nice_servers = [{urls = "http://x"}]\n',
            r"webrtc.ice_servers.0.urls: .*not a stun:",
        ),
        ("[webrtc]\nice_servers = [{urls = []}]\n", r"webrtc.ice_servers.0.urls: .*at least 1"),
        ("[webrtc]\nmedia_timeout_s = 0\n", r"webrtc.media_timeout_s: .*greater than 0"),
        ('[[webhooks]]\nname = "a"\nurl = "ftp://x"\n', r"webhooks.0.url: String should match"),
        (
            '[[webhooks]]\nname = "a"\nurl = "http://x"\nsecrets = ["nope!"]\n',
            r"webhooks.0.secrets: .*not base64",
        ),
        ('[[webhooks]]\nname = "a"\nurl = "http://x"\nmode = "fifo"\n', r"webhooks.0.mode: "),
        ('[[webhooks]]\nname = "call"\nurl = "http://x"\n', r"'call' is reserved"),
        (
            '[[webhooks]]\nname="a"\nurl="http://x"\n[[webhooks]]\nname="a"\nurl="http://y"\n',
            r"names must be unique",
        ),
        ('[nats]\nurl = "http://x:4222"\n', r"nats.url: .*expected nats://"),
        ('[outbox]\nsynchronous = "OFF"\n', r"outbox.synchronous: "),
        (
            "[rtp]\nreceive_buffer_bytes = 3000000000\n",
            r"rtp.receive_buffer_bytes: .*less than or equal to 268435456",
        ),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, toml: str, message: str) -> None:
    f = tmp_path / "v.toml"
    f.write_text(toml)
    with pytest.raises(ConfigError, match=message):
        load_config(f, environ={})


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml", environ={})


def test_vllm_slots_must_cover_the_call_limit() -> None:
    message = r"max_num_seqs \(10\) is below calls.max_concurrent \(50\)"
    with pytest.raises(ConfigError, match=message):
        load_config(overrides={"engine.vllm.max_num_seqs": 10}, environ={})


@pytest.mark.parametrize(
    ("audiosocket_host", "refused"), [("127.0.0.1", True), ("0.0.0.0", True), ("10.1.2.3", False)]
)
def test_audiosocket_and_http_on_one_port_are_refused_where_they_would_collide(
    audiosocket_host: str, refused: bool
) -> None:
    """They used to fail at start as "cannot listen for HTTP …: Address already in use", though
    nothing else held the port: voxphone's own AudioSocket listener had taken it."""
    overrides = {"http.port": 8082, "asterisk.audiosocket_port": 8082,
                 "asterisk.audiosocket_host": audiosocket_host}  # fmt: skip
    if not refused:  # another address: both can listen
        assert load_config(overrides=overrides, environ={}).asterisk.audiosocket_port == 8082
        return
    message = "asterisk.audiosocket_port and http.port are both 8082"
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides, environ={})


def test_remote_urls_must_be_websockets() -> None:
    message = "override: engine.vllm_remote.urls: expected ws:// or wss:// URLs, got 'http://x"
    with pytest.raises(ConfigError, match=message):  # our validator's words, nothing before them
        load_config(overrides={"engine.vllm_remote.urls": ["http://x/v1/realtime"]}, environ={})


def test_payload_types_from_file_and_environment(tmp_path: Path) -> None:
    f = tmp_path / "v.toml"
    f.write_text('[rtp.payload_types]\n120 = "G722"\n')
    c = load_config(f, environ={})
    assert c.rtp.codec_map()[120].name == "G722"
    assert c.rtp.codec_map()[0].name == "PCMU"
    env = {"VOXPHONE_RTP__PAYLOAD_TYPES": '{"119": "L16/8000"}'}
    assert load_config(environ=env).rtp.codec_map()[119].name == "L16/8000"


@pytest.mark.parametrize(
    ("types", "message"),
    [({"5": "opus"}, "payload type 5 is not dynamic"), ({"100": "speex"}, "unknown codec 'speex'")],
)
def test_bad_payload_types(types: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=f"rtp.payload_types: .*{message}"):
        load_config(overrides={"rtp.payload_types": types}, environ={})


def test_bad_environment_override_is_reported_by_key() -> None:
    with pytest.raises(ConfigError, match="calls.max_concurrent: Input should be greater"):
        load_config(environ={"VOXPHONE_CALLS__MAX_CONCURRENT": "0"})


def test_webhook_endpoints_from_file_and_environment(tmp_path: Path) -> None:
    f = tmp_path / "v.toml"
    f.write_text(
        '[[webhooks]]\nname = "crm"\nurl = "https://crm/hooks"\ntypes = ["call.*"]\n'
        'mode = "parallel"\nhorizons_s = { "call.ended" = 600.0 }\n'
    )
    env = {"VOXPHONE_OUTBOX__PATH": str(tmp_path / "e.db"), "VOXPHONE_NATS__URL": "nats://n:4222"}
    c = load_config(f, environ=env)
    (crm,) = c.webhooks
    assert (crm.name, crm.mode, crm.types) == ("crm", "parallel", ["call.*"])
    assert crm.horizons_s == {"transcript.delta": 10.0, "*": 259200.0, "call.ended": 600.0}
    assert c.outbox.resolved_path() == tmp_path / "e.db"
    assert c.nats.url == "nats://n:4222" and not c.nats.coalesce_deltas
    assert load_config(environ={}).outbox.resolved_path({"XDG_DATA_HOME": "/d"}) == Path(
        "/d/voxphone/events.db"
    )


@pytest.mark.parametrize(
    ("env", "overrides", "message"),
    [
        (
            {"VOXPHONE_RTP__INACTIVITY_TIMEOUT_S": "-1"},
            {},
            "VOXPHONE_RTP__INACTIVITY_TIMEOUT_S: rtp.inactivity_timeout_s: Input should be greater",
        ),
        ({}, {"http.port": 99999}, "--http-port: http.port: Input should be less than"),
        ({"VOXPHONE_HTTTP__PORT": "1"}, {}, "VOXPHONE_HTTTP__PORT: htttp: unknown key"),
        (
            {"VOXPHONE_RTP__PAYLOAD_TYPES": '{"5": "opus"}'},
            {},
            "VOXPHONE_RTP__PAYLOAD_TYPES: rtp.payload_types: .*not dynamic",
        ),
        ({"VOXPHONE_RTP__PORTS": "[1"}, {}, "VOXPHONE_RTP__PORTS: invalid JSON"),
        (
            {"VOXPHONE_WEBRTC__INTERFACES": "eth0"},
            {},
            "VOXPHONE_WEBRTC__INTERFACES: webrtc.interfaces: Input should be a valid list; "
            "a variable gives it as JSON, e.g. VOXPHONE_WEBRTC__INTERFACES='\\[",
        ),
        (
            {"VOXPHONE_RTP__PAYLOAD_TYPES": "96=opus"},
            {},
            "VOXPHONE_RTP__PAYLOAD_TYPES: rtp.payload_types: .*; a variable gives it as JSON, "
            "e.g. VOXPHONE_RTP__PAYLOAD_TYPES='{",
        ),
        (
            {"VOXPHONE_RTP__HOST__X": "1"},
            {},
            "VOXPHONE_RTP__HOST__X: rtp.host.x: 'host' is a value",
        ),
    ],
)
def test_a_bad_variable_or_flag_is_blamed_not_the_file(
    tmp_path: Path, env: dict[str, str], overrides: dict[str, object], message: str
) -> None:
    """The file is valid; the error names the variable or flag that set the bad value."""
    f = tmp_path / "my.toml"
    f.write_text('[rtp]\ninactivity_timeout_s = 3\nhost = "127.0.0.1"\n[http]\nport = 8000\n')
    with pytest.raises(ConfigError, match=f"^{message}") as err:
        load_config(f, overrides, env, flags={"http.port": "--http-port"})
    assert "my.toml" not in str(err.value)


def test_the_file_is_blamed_for_its_own_mistakes_alongside_a_variable(tmp_path: Path) -> None:
    f = tmp_path / "my.toml"
    f.write_text("[rtp]\ninactivity_timeout_s = 0\n")
    env = {"VOXPHONE_HTTP__PORT": "-5"}
    with pytest.raises(ConfigError) as err:
        load_config(f, environ=env)
    assert str(err.value).splitlines() == [
        "VOXPHONE_HTTP__PORT: http.port: Input should be greater than or equal to 0",
        f"{f}: rtp.inactivity_timeout_s: Input should be greater than 0",
    ]


@pytest.mark.parametrize(("secret", "why"), [("abc", "not base64"), ("abcd", "3 bytes, too short")])
def test_a_bad_webhook_secret_says_what_one_is_and_how_to_make_one(secret: str, why: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(overrides={"webhook.secret": secret}, environ={})
    message = str(err.value)
    assert why in message and "a secret is 'whsec_' + base64 of 24 to 64 random bytes" in message
    assert MAKE_SECRET in message
    made = subprocess.run(shlex.split(MAKE_SECRET), capture_output=True, text=True, check=True)
    assert load_config(overrides={"webhook.secret": made.stdout.strip()}, environ={})


@pytest.mark.parametrize(("setting", "expected"), [({}, False), ({"async": True}, True)])
def test_vllm_async_scheduling_is_off_unless_asked(
    setting: dict[str, bool], expected: bool
) -> None:
    """Off by default: it multiplied lag ~9× at 256 streaming calls on an H200 (README)."""
    from voxphone.app import create_engine

    overrides: dict[str, object] = {"engine.kind": "vllm"}
    if setting:
        overrides["engine.vllm.async_scheduling"] = setting["async"]
    engine = create_engine(load_config(overrides=overrides, environ={}))
    assert [w.args["async_scheduling"] for w in engine.workers] == [expected]


@pytest.mark.parametrize(
    ("name", "meant"),
    [
        ("VOXPHONE_HTTP_PORT", "VOXPHONE_HTTP__PORT"),
        ("VOXPHONE_ENGINE_VLLM_ENGINES", "VOXPHONE_ENGINE__VLLM__ENGINES"),
        ("VOXPHONE_CALLS_MAX_CONCURRENT", "VOXPHONE_CALLS__MAX_CONCURRENT"),
    ],
)
def test_a_variable_with_single_underscores_is_named_not_ignored(name: str, meant: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(environ={name: "9"})
    assert str(err.value) == (
        f"{name}: not read: a key inside a section takes a double underscore, {meant}"
    )


def test_other_voxphone_variables_are_not_config_keys() -> None:
    """Names that are no config key written wrongly (a test's, a script's) are left alone."""
    assert load_config(environ={"VOXPHONE_TEST_IMPORTS": "/tmp/x", "VOXPHONE_HTTP": "1"})
