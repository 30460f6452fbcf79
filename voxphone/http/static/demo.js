// voxphone demo: a WHIP client with trickle ICE, a mic meter and a live transcript.
// Events arrive on the "events" data channel the page opens; `?token=` is sent as a bearer token.
// The mic goes out sendrecv, so what the bot plays into the call (POST /v1/calls/{id}/play)
// comes back on the same transceiver and plays in the <audio id="bot"> element.
"use strict";

const $ = (id) => document.getElementById(id);
const token = new URLSearchParams(location.search).get("token");
const auth = token ? { Authorization: `Bearer ${token}` } : {};

let pc = null, channel = null, stream = null, session = null, audioCtx = null, timer = null;
let pendingCandidates = [], started = 0, eventCount = 0;

function setStatus(text, state = "idle") {
  $("status").textContent = text;
  $("status").dataset.state = state;
}

function line(segmentId) {
  let p = document.querySelector(`#transcript p[data-segment="${segmentId}"]`);
  if (!p) {
    document.querySelector("#transcript .hint")?.remove();
    p = document.createElement("p");
    p.dataset.segment = segmentId;
    p.className = "partial";
    $("transcript").append(p);
  }
  return p;
}

function note(text) {
  const p = document.createElement("p");
  p.className = "note";
  p.textContent = text;
  $("transcript").append(p);
}

// DTMF the bot sends (voxphone: {"type": "bot.dtmf", "digit", "duration_ms"}): heard as the
// key's two tones (ITU-T Q.23), so the caller hears what a phone would play.
const DTMF_HZ = { 1: [697, 1209], 2: [697, 1336], 3: [697, 1477], A: [697, 1633],
  4: [770, 1209], 5: [770, 1336], 6: [770, 1477], B: [770, 1633],
  7: [852, 1209], 8: [852, 1336], 9: [852, 1477], C: [852, 1633],
  "*": [941, 1209], 0: [941, 1336], "#": [941, 1477], D: [941, 1633] };

function tone(digit, durationMs) {
  const freqs = DTMF_HZ[digit];
  if (!audioCtx || !freqs) return;
  const end = audioCtx.currentTime + durationMs / 1000;
  for (const hz of freqs) {
    const osc = audioCtx.createOscillator();
    const gain = audioCtx.createGain();
    osc.frequency.value = hz;
    gain.gain.value = 0.1;
    osc.connect(gain).connect(audioCtx.destination);
    osc.start();
    osc.stop(end);
  }
}

function onMessage(message) {
  if (message.type === "bot.dtmf") {
    note(`bot key ${message.digit}`);
    tone(message.digit, message.duration_ms);
  } else {
    onEvent(message);
  }
}

function onEvent(event) {
  eventCount += 1;
  $("count").textContent = eventCount;
  $("events").textContent += JSON.stringify(event) + "\n";
  const d = event.data || {};
  if (event.type === "transcript.delta") {
    const p = line(d.segment_id);
    if (p.className === "partial") p.textContent += d.text;
  } else if (event.type === "transcript.final") {
    const p = line(d.segment_id);
    p.textContent = d.text;
    p.className = "final";
  } else if (event.type === "dtmf") {
    note(`key ${d.digit}`);
  } else if (event.type === "call.ended") {
    note(`call ended: ${d.reason}`);
    cleanup(`ended (${d.reason})`);
  } else if (event.type === "engine.error") {
    note(`engine: ${d.message}`);
  } else if (event.type === "playback.started") {
    $("bot-state").textContent = "bot speaking";
  } else if (event.type === "playback.finished" || event.type === "playback.cleared") {
    $("bot-state").textContent = "";
  }
  $("transcript").scrollTop = $("transcript").scrollHeight;
}

function sdpfrag(candidates) {
  const lines = [];
  for (const c of candidates) {
    if (c.sdpMid !== null) lines.push(`a=mid:${c.sdpMid}`);
    lines.push(`a=${c.candidate}`);
  }
  return lines.join("\r\n") + "\r\n";
}

async function trickle(candidates) {
  if (!session || candidates.length === 0) return;
  await fetch(session, {
    method: "PATCH",
    headers: { "Content-Type": "application/trickle-ice-sdpfrag", ...auth },
    body: sdpfrag(candidates),
  });
}

function meter(mic) {
  audioCtx = new AudioContext();
  const analyser = audioCtx.createAnalyser();
  analyser.fftSize = 512;
  audioCtx.createMediaStreamSource(mic).connect(analyser);
  const samples = new Float32Array(analyser.fftSize);
  const draw = () => {
    if (!audioCtx) return;
    analyser.getFloatTimeDomainData(samples);
    const rms = Math.sqrt(samples.reduce((s, x) => s + x * x, 0) / samples.length);
    $("level").style.width = `${Math.min(100, rms * 400)}%`;
    requestAnimationFrame(draw);
  };
  draw();
}

function tick() {
  const s = Math.floor((Date.now() - started) / 1000);
  $("duration").textContent = `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
}

async function call() {
  $("call").disabled = true;
  setStatus("connecting…");
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    pc = new RTCPeerConnection();
    // sendrecv: the bot's voice comes back on the same m= line.
    for (const track of stream.getAudioTracks()) pc.addTransceiver(track, { direction: "sendrecv" });
    pc.ontrack = (e) => {
      $("bot").srcObject = e.streams[0] || new MediaStream([e.track]);
      $("bot").play().catch(() => note("press play to hear the bot"));
    };
    channel = pc.createDataChannel("events");
    channel.onmessage = (e) => onMessage(JSON.parse(e.data));
    pc.onicecandidate = (e) => {
      if (!e.candidate || !e.candidate.candidate) return;
      if (session) trickle([e.candidate]);
      else pendingCandidates.push(e.candidate);
    };
    pc.onconnectionstatechange = () => {
      if (pc && pc.connectionState === "connected") setStatus("live", "live");
      if (pc && pc.connectionState === "failed") cleanup("connection failed", "error");
    };
    await pc.setLocalDescription(await pc.createOffer());
    const res = await fetch("/v1/whip", {
      method: "POST",
      headers: { "Content-Type": "application/sdp", ...auth },
      body: pc.localDescription.sdp,
    });
    if (res.status !== 201) {
      const body = await res.text();
      throw new Error(`${res.status}: ${body}`);
    }
    session = new URL(res.headers.get("Location"), location.href).href;
    await pc.setRemoteDescription({ type: "answer", sdp: await res.text() });
    trickle(pendingCandidates.splice(0));
    meter(stream);
    started = Date.now();
    timer = setInterval(tick, 500);
    $("hangup").disabled = false;
    $("transcript").replaceChildren();
  } catch (err) {
    note(String(err.message || err));
    cleanup("error", "error");
  }
}

async function hangup() {
  $("hangup").disabled = true;
  setStatus("hanging up…");
  const call = pc;
  if (session) await fetch(session, { method: "DELETE", headers: auth });
  // call.ended arrives on the data channel with the last words, then cleanup(). The server
  // gives its engine up to 10 s (plus any audio still queued) to finish them, so wait longer
  // than that before giving up; and only on this call, not one that has ended or a new one.
  setTimeout(() => {
    if (pc && pc === call) cleanup("ended (no call.ended from the server)");
  }, 30000);
}

function cleanup(status, state = "idle") {
  clearInterval(timer);
  if (audioCtx) audioCtx.close();
  audioCtx = null;
  if (stream) stream.getTracks().forEach((t) => t.stop());
  if (pc) pc.close();
  $("bot").srcObject = null;
  $("bot-state").textContent = "";
  pc = channel = stream = session = null;
  pendingCandidates = [];
  $("level").style.width = "0";
  $("call").disabled = false;
  $("hangup").disabled = true;
  setStatus(status, state);
}

function dtmf(digit) {
  if (channel && channel.readyState === "open") channel.send(JSON.stringify({ type: "dtmf", digit }));
}

for (const key of "123456789*0#") {
  const b = document.createElement("button");
  b.textContent = key;
  b.onclick = () => dtmf(key);
  $("keys").append(b);
}

$("call").onclick = call;
$("hangup").onclick = hangup;
// A closing tab hangs up at once instead of waiting for the media timeout.
addEventListener("pagehide", () => {
  if (session) fetch(session, { method: "DELETE", headers: auth, keepalive: true });
});
