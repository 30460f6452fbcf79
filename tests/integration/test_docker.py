"""docker/: the images and the compose files, tested without a docker daemon (none here).

Each Dockerfile is parsed with dockerfile-parse: every ``COPY`` source exists and is not
``.dockerignore``d, the image runs as a non-root user with a ``HEALTHCHECK``, and its ``ENV`` is
a valid voxphone config. The CPU image's install runs in a fresh venv, its entrypoint serves
there until its own health check passes, and SIGTERM stops it with exit 0. The compose files'
voxphone environments are valid configs that publish the UDP range.
"""

from __future__ import annotations

import asyncio
import fnmatch
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from dockerfile_parse import DockerfileParser

from tests.conftest import free_tcp_port, free_udp_range
from voxphone.config import load_config

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]
DOCKER = ROOT / "docker"
UDP_RANGE = "40000-40100:40000-40100/udp"
#: What a deployment provides at run time (the images refuse to serve without a token).
RUNTIME_ENV = {
    "VOXPHONE_TOKEN": "test-token",
    "WEBHOOK_SECRET": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    "ADVERTISE_HOST": "203.0.113.7",
}


def parse(name: str) -> DockerfileParser:
    return DockerfileParser(fileobj=io.BytesIO((DOCKER / name).read_bytes()))


def commands(df: DockerfileParser, kind: str) -> list[str]:
    return [i["value"] for i in df.structure if i["instruction"] == kind]


def copies(df: DockerfileParser) -> list[tuple[list[str], str]]:
    """``COPY src... dest`` → ([src...], dest)."""
    result = []
    for value in commands(df, "COPY"):
        *sources, dest = shlex.split(value)
        assert not any(s.startswith("--") for s in sources), "no --from/--chown needed"
        result.append((sources, dest))
    return result


def ignored(path: str) -> bool:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    return any(fnmatch.fnmatch(path, p) or path.startswith(p.rstrip("/") + "/") for p in patterns)


def exec_form(value: str) -> list[str]:
    """A JSON-array (exec form) instruction's argv."""
    argv = json.loads(value)
    assert isinstance(argv, list), value
    return [str(a) for a in argv]


def healthcheck(df: DockerfileParser) -> list[str]:
    (value,) = commands(df, "HEALTHCHECK")
    return exec_form(value[value.index("CMD") + 3 :].strip())


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_each_image_copies_what_exists_runs_as_non_root_and_checks_its_health(name: str) -> None:
    df = parse(name)
    for sources, _ in copies(df):
        for source in sources:
            assert (ROOT / source).exists(), f"{name}: COPY {source}: not in the build context"
            assert not ignored(source), f"{name}: COPY {source} is .dockerignored"
    user = commands(df, "USER")[-1]
    assert user not in ("root", "0"), f"{name} runs as root"
    assert "/health" in " ".join(healthcheck(df))
    assert exec_form(commands(df, "ENTRYPOINT")[-1]) == ["voxphone"]
    env = {k: v for k, v in df.envs.items() if k.startswith("VOXPHONE_")}
    config = load_config(None, environ={**env, "VOXPHONE_HTTP__TOKEN": "t"})
    assert config.http.host == "0.0.0.0" and config.rtp.host == "0.0.0.0"
    # Without a token, the published API is refused at start (secure by default).
    assert load_config(None, environ=env).http.exposure_error() is not None
    rtp, webrtc = config.rtp.ports, config.webrtc.ports
    assert webrtc is not None and 40000 <= rtp[0] <= rtp[1] < webrtc[0] <= webrtc[1] <= 40100


def test_the_gpu_image_is_vllms_own_with_the_vllm_engine() -> None:
    df = parse("Dockerfile.gpu")
    assert df.baseimage.startswith("vllm/vllm-openai:"), df.baseimage
    env = {k: v for k, v in df.envs.items() if k.startswith("VOXPHONE_")}
    config = load_config(None, environ={**env, "VOXPHONE_HTTP__TOKEN": "t"})
    assert config.engine.kind == "vllm" and config.engine.vllm.engines >= 1
    assert any('"/src[vllm]"' in run for run in commands(df, "RUN"))


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """The CPU image's COPYs and ``pip install`` run into a fresh venv (it sees the system's
    packages, so only voxphone itself is built: seconds, not minutes): (venv, image ENV)."""
    df = parse("Dockerfile")
    root = tmp_path_factory.mktemp("image")
    for sources, dest in copies(df):
        for source in sources:
            target = root / dest.lstrip("/")
            if dest.endswith("/"):
                target = target / Path(source).name
            copy = shutil.copytree if (ROOT / source).is_dir() else shutil.copy
            target.parent.mkdir(parents=True, exist_ok=True)
            copy(ROOT / source, target)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)  # the installed copy, not the worktree
    for run in commands(df, "RUN"):
        argv = shlex.split(run)
        if argv[0] == "useradd":
            continue  # the container's user: nothing to install
        assert argv[:2] == ["pip", "install"], f"unexpected RUN: {run}"
        argv = [
            str(venv / "bin" / "pip"),
            *[re.sub(r"^/src", str(root / "src"), a) for a in argv[1:]],
        ]
        subprocess.run(argv, check=True, env=env, capture_output=True, timeout=300)
    return venv, {k: v for k, v in df.envs.items()}


async def test_the_cpu_image_serves_from_its_own_install_until_sigterm(
    installed: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    """ENTRYPOINT + CMD with the image's ENV (ports made free, the token a deployment gives):
    the HEALTHCHECK command passes, and SIGTERM ends it with exit 0."""
    venv, image_env = installed
    df = parse("Dockerfile")
    http_port, (lo, hi) = free_tcp_port(), free_udp_range(4)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= image_env | {
        "PATH": f"{venv / 'bin'}:{os.environ['PATH']}",
        "VOXPHONE_HTTP__PORT": str(http_port), "VOXPHONE_HTTP__TOKEN": "t",
        "VOXPHONE_RTP__PORTS": f"{lo}-{lo + 1}", "VOXPHONE_WEBRTC__PORTS": f"{lo + 2}-{hi}",
        "VOXPHONE_OUTBOX__PATH": str(tmp_path / "events.db"), "VOXPHONE_ENGINE__SPHINX__WORKERS": "1",
    }  # fmt: skip
    where = await asyncio.create_subprocess_exec(
        "python", "-c", "import voxphone; print(voxphone.__file__)", env=env, cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await where.communicate()
    assert out.decode().startswith(str(venv)), out
    argv = exec_form(commands(df, "ENTRYPOINT")[-1]) + exec_form(commands(df, "CMD")[-1])
    log = (tmp_path / "serve.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        stdout=log,
        stderr=log,
        cwd=tmp_path,  # WORKDIR: not the source tree
    )
    try:
        check = healthcheck(df)
        async with asyncio.timeout(60):
            while await _run(check, env) != 0:
                assert proc.returncode is None, (tmp_path / "serve.log").read_text()[-2000:]
                await asyncio.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
        log.close()
    assert "Traceback" not in (tmp_path / "serve.log").read_text()


async def _run(argv: list[str], env: dict[str, str]) -> int:
    p = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    return await p.wait()


def substitute(value: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}`` (nested defaults too)."""
    pattern = re.compile(r"\$\{(\w+)(?::([-?])((?:[^{}]|\$\{[^}]*\})*))?\}")
    while (m := pattern.search(value)) is not None:
        name, op, arg = m.groups()
        if name in env:
            got = env[name]
        elif op == "-":
            got = substitute(arg, env)
        else:
            raise AssertionError(f"${{{name}}} is required: {arg}")
        value = value[: m.start()] + got + value[m.end() :]
    return value


def service_config(compose: dict[str, Any], service: str) -> dict[str, str]:
    """The service's image ENV (its Dockerfile) with its compose environment on top."""
    svc = compose["services"][service]
    image = parse(Path(svc["build"]["dockerfile"]).name).envs
    env = {k: substitute(str(v), RUNTIME_ENV) for k, v in svc["environment"].items()}
    return {**image, **env}


@pytest.mark.parametrize("name", ["compose.yaml", "compose.cpu.yaml"])
def test_compose_publishes_udp_and_configures_voxphone_from_the_environment(name: str) -> None:
    compose = yaml.safe_load((DOCKER / name).read_text())
    voxphone = compose["services"]["voxphone"]
    assert (DOCKER / voxphone["build"]["context"] / voxphone["build"]["dockerfile"]).exists()
    assert UDP_RANGE in voxphone["ports"]
    for key, var in (("VOXPHONE_RTP__ADVERTISE_HOST", "ADVERTISE_HOST"),
                     ("VOXPHONE_WEBRTC__PUBLIC_IP", "PUBLIC_IP")):  # fmt: skip
        assert f"${{{var}" in voxphone["environment"][key], key
    env = service_config(compose, "voxphone")
    config = load_config(None, environ={k: v for k, v in env.items() if k.startswith("VOXPHONE_")})
    assert config.http.exposure_error() is None  # a token from the environment
    assert config.rtp.advertise_host == config.webrtc.public_ip == "203.0.113.7"
    assert config.webhook.url == "http://receiver:9000/hooks"
    receiver = compose["services"]["receiver"]
    assert receiver["command"][0] == "receive" and "9000" in receiver["command"]
    grace = int(voxphone["stop_grace_period"].rstrip("s"))
    assert grace > config.calls.drain_s  # the orchestrator waits for the drain
    with pytest.raises(AssertionError, match=r"VOXPHONE_TOKEN\} is required"):
        substitute(voxphone["environment"]["VOXPHONE_HTTP__TOKEN"], {})


def test_the_gpu_compose_serves_voxtral_with_the_model_cards_flags() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    vllm = compose["services"]["vllm"]
    assert vllm["image"].startswith("vllm/vllm-openai:")
    flags = " ".join(vllm["command"])
    assert vllm["command"][0] == "mistralai/Voxtral-Mini-4B-Realtime-2602"
    for flag in ("--tokenizer-mode=mistral", "--config-format=mistral", "--load-format=mistral",
                 '"cudagraph_mode": "PIECEWISE"', "--port=8000"):  # fmt: skip
        assert flag in flags, flag
    env = service_config(compose, "voxphone")
    config = load_config(None, environ={k: v for k, v in env.items() if k.startswith("VOXPHONE_")})
    assert config.engine.kind == "vllm-remote"
    assert config.engine.vllm_remote.urls == ["ws://vllm:8000/v1/realtime"]
