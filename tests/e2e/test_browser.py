"""The demo page in a real headless Chromium: Call, speak (a flite file as the microphone), see
the words on the page and in the signed webhooks, hang up.

Chromium and ChromeDriver are Debian's (``chromium``, ``chromium-driver``; the README test
command installs them). Screenshots of the page mid-call, at desktop and phone widths, are
written to ``artifacts/`` (or ``$VOXPHONE_ARTIFACTS``).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import Speech, overlap, require
from tests.integration.test_serve import WebhookReceiver, calls_of, running_serve

pytestmark = pytest.mark.integration

TOKEN = "demo-token"
ARTIFACTS = Path(os.environ.get("VOXPHONE_ARTIFACTS", Path(__file__).parents[2] / "artifacts"))


@pytest.fixture
def microphone(speech: dict[str, Speech], tmp_path: Path) -> Path:
    """The sentence with 1.5 s of silence after it: Chromium loops the file as the mic."""
    out = tmp_path / "mic.wav"
    subprocess.run(
        [require("ffmpeg"), "-loglevel", "error", "-i", str(speech["order"].path),
         "-af", "apad=pad_dur=1.5", "-ar", "48000", str(out)],
        check=True,
    )  # fmt: skip
    return out


@pytest.fixture
def browser(microphone: Path, tmp_path: Path) -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = require("chromium")
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--disable-quic", "--window-size=1100,900",
        f"--user-data-dir={tmp_path / 'chromium'}",
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={microphone}",
        "--allow-loopback-in-peer-connection",  # ICE over 127.0.0.1 only
        "--autoplay-policy=no-user-gesture-required",  # the bot's <audio> and its level meter
    ):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(require("chromedriver")))
    try:
        yield driver
    finally:
        driver.quit()


def text_of(driver: WebDriver, element_id: str) -> str:
    return str(driver.find_element(By.ID, element_id).text)


def finals(driver: WebDriver) -> str:
    return " ".join(p.text for p in driver.find_elements(By.CSS_SELECTOR, "#transcript p.final"))


#: The loudest sample (0..1) the page's <audio id="bot"> stream carries over 1.5 s.
BOT_PEAK_JS = """
const done = arguments[arguments.length - 1];
const ctx = new AudioContext();
const analyser = ctx.createAnalyser();
analyser.fftSize = 2048;
ctx.createMediaStreamSource(document.getElementById("bot").srcObject).connect(analyser);
const samples = new Float32Array(analyser.fftSize);
let peak = 0;
const timer = setInterval(() => {
  analyser.getFloatTimeDomainData(samples);
  for (const x of samples) peak = Math.max(peak, Math.abs(x));
}, 50);
setTimeout(() => { clearInterval(timer); ctx.close(); done(peak); }, 1500);
"""


#: What the page's peer connection sends: its Opus format parameters (from voxphone's answer) and
#: the mean payload per packet (bytes).
SENT_OPUS_JS = """
const done = arguments[arguments.length - 1];
pc.getStats().then((report) => {
  const out = [...report.values()].find((s) => s.type === "outbound-rtp" && s.kind === "audio");
  const codec = report.get(out.codecId);
  done({fmtp: codec.sdpFmtpLine || "", payload: out.bytesSent / out.packetsSent});
});
"""


def hear_the_bot(browser: WebDriver, http_port: int, said: Speech) -> None:
    """A bot plays into the page's call (``POST /v1/calls/{id}/play``): the page says so and
    its <audio id="bot"> stream carries the sound."""
    log = browser.find_element(By.ID, "events").get_attribute("textContent") or ""
    call_id = json.loads(log.splitlines()[0])["call_id"]
    request = urllib.request.Request(
        f"http://localhost:{http_port}/v1/calls/{call_id}/play",
        data=said.path.read_bytes(),
        headers={"Content-Type": "audio/wav", "Authorization": f"Bearer {TOKEN}"},
        method="POST",
    )
    with urllib.request.urlopen(request) as resp:
        assert resp.status == 202
    WebDriverWait(browser, 10).until(lambda d: text_of(d, "bot-state") == "bot speaking")
    browser.set_script_timeout(10)
    assert browser.execute_async_script(BOT_PEAK_JS) > 0.01, "the page hears no bot audio"


async def test_demo_page_call_shows_the_words_and_hangs_up(
    browser: WebDriver, receiver: WebhookReceiver, speech: dict[str, Speech], tmp_path: Path
) -> None:
    expected = speech["order"].text
    env = {"VOXPHONE_HTTP__TOKEN": TOKEN, "VOXPHONE_WEBRTC__INTERFACES": '["127.0.0.1"]'}
    async with running_serve(tmp_path, receiver, **env) as serve:
        url = f"http://localhost:{serve.http_port}/?token={TOKEN}"

        def call_and_listen() -> None:
            browser.get(url)
            assert browser.title.startswith("voxphone")
            browser.find_element(By.ID, "call").click()
            WebDriverWait(browser, 60).until(lambda d: overlap(expected, finals(d)) >= 0.7)
            assert text_of(browser, "status") == "live"
            # The answer is sendrecv: the bot's track plays in the page's <audio id="bot">.
            bot_tracks = browser.execute_script(
                "const s = document.getElementById('bot').srcObject;"
                "return s ? s.getAudioTracks().filter((t) => t.readyState === 'live').length : 0"
            )
            assert bot_tracks == 1
            # The answer's maxplaybackrate (RFC 7587 §6.1) makes Chromium code wideband at
            # libwebrtc's 20 kbit/s for it (48 bytes a packet on this clip, pauses included),
            # not fullband at 32 (81 bytes on it without the parameter).
            browser.set_script_timeout(10)
            sent = browser.execute_async_script(SENT_OPUS_JS)
            assert "maxplaybackrate=16000" in sent["fmtp"] and sent["payload"] < 64, sent
            hear_the_bot(browser, serve.http_port, speech["phone"])
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            browser.save_screenshot(str(ARTIFACTS / "browser-call.png"))
            browser.set_window_size(390, 844)  # a phone
            overflow = browser.execute_script(
                "return document.documentElement.scrollWidth - window.innerWidth"
            )
            assert overflow <= 0, f"page is {overflow}px wider than a phone screen"
            browser.save_screenshot(str(ARTIFACTS / "browser-call-phone.png"))
            # The keypad stays put while words arrive above it (the transcript's height is
            # fixed), so the click on its summary opens it.
            keypad = browser.find_element(By.CSS_SELECTOR, ".keypad")
            keypad.find_element(By.TAG_NAME, "summary").click()
            WebDriverWait(browser, 5).until(lambda d: keypad.get_property("open"))
            browser.find_element(By.XPATH, "//div[@id='keys']/button[text()='5']").click()
            WebDriverWait(browser, 10).until(lambda d: "key 5" in text_of(d, "transcript"))
            browser.find_element(By.ID, "hangup").click()
            WebDriverWait(browser, 30).until(lambda d: text_of(d, "status") == "ended (hangup)")

        await asyncio.to_thread(call_and_listen)
        await receiver.wait_ended(1, 15)
    (events,) = calls_of(receiver).values()
    started, ended = events[0], events[-1]
    assert started["data"]["transport"] == "webrtc" and started["data"]["codec"] == "opus"
    assert "Chrome" in started["data"]["user_agent"]
    assert ended["data"]["reason"] == "hangup"
    assert [e["data"]["digit"] for e in events if e["type"] == "dtmf"] == ["5"]
    assert overlap(expected, ended["data"]["transcript"]) >= 0.7, ended["data"]["transcript"]
    # The page's event log shows what the webhook got, in the same order.
    log = browser.find_element(By.ID, "events").get_attribute("textContent") or ""
    page_ids = [line.split('"id":"')[1][:36] for line in log.splitlines() if '"id":"' in line]
    assert page_ids == [e["id"] for e in events]
