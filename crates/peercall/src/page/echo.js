"use strict";
// The token may come in the URL fragment (#token=...), which browsers never send
// to the server.
const fragment = new URLSearchParams(location.hash.slice(1));
const $ = (id) => document.getElementById(id);
if (fragment.get("token")) $("token").value = fragment.get("token");

const echoTest = {
  pc: null,
  mic: null,
  session: null,
  remote: null,
  state: "idle",
  error: null,
  timer: null,

  setState(s) { this.state = s; $("state").textContent = s; },

  fail(e) {
    this.error = String(e && e.message || e);
    $("error").textContent = this.error;
    this.setState("failed");
  },

  // Starts an echo session. `raw` turns the browser's own audio processing off (so
  // what comes back is what the microphone gave); `muted` keeps the echo silent.
  async start({ raw = false, muted = false } = {}) {
    if (this.pc) return;
    this.error = null;
    $("error").textContent = "";
    this.setState("asking for the microphone");
    const processing = !raw;
    const mic = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: processing, noiseSuppression: processing,
               autoGainControl: processing, channelCount: 1 },
    });
    this.mic = mic;
    const pc = new RTCPeerConnection({ bundlePolicy: "max-bundle" });
    this.pc = pc;
    const remoteReady = new Promise((resolve) => {
      pc.ontrack = (ev) => {
        this.remote = ev.streams[0] || new MediaStream([ev.track]);
        const out = $("out");
        out.muted = muted;
        out.srcObject = this.remote;
        resolve(this.remote);
      };
    });
    const connected = new Promise((resolve, reject) => {
      pc.onconnectionstatechange = () => {
        this.setState(pc.connectionState);
        if (pc.connectionState === "connected") resolve();
        if (pc.connectionState === "failed") reject(new Error("the connection failed"));
      };
    });
    for (const track of mic.getAudioTracks()) pc.addTransceiver(track, { direction: "sendrecv", streams: [mic] });
    await pc.setLocalDescription(await pc.createOffer());
    this.setState("offering");
    const response = await fetch("/v1/webrtc/offer?echo=1", {
      method: "POST",
      headers: { "Authorization": "Bearer " + $("token").value.trim(),
                 "Content-Type": "application/sdp" },
      body: pc.localDescription.sdp,
    });
    const body = await response.json();
    if (!response.ok) throw new Error(body.error || ("HTTP " + response.status));
    this.session = body.session;
    $("session").textContent = body.session;
    await pc.setRemoteDescription({ type: "answer", sdp: body.answer });
    this.setState("connecting");
    await Promise.all([connected, remoteReady]);
    $("start").disabled = true;
    $("stop").disabled = false;
    this.timer = setInterval(() => this.showStats(), 1000);
  },

  async stats() {
    const out = { rttMs: null, packetsReceived: 0, packetsLost: 0, jitterMs: null, packetsSent: 0 };
    if (!this.pc) return out;
    const report = await this.pc.getStats();
    report.forEach((s) => {
      if (s.type === "candidate-pair" && s.nominated && s.currentRoundTripTime !== undefined)
        out.rttMs = s.currentRoundTripTime * 1000;
      if (s.type === "inbound-rtp" && s.kind === "audio") {
        out.packetsReceived = s.packetsReceived;
        out.packetsLost = s.packetsLost;
        out.jitterMs = s.jitter * 1000;
      }
      if (s.type === "outbound-rtp" && s.kind === "audio") out.packetsSent = s.packetsSent;
    });
    return out;
  },

  async showStats() {
    const s = await this.stats();
    $("rtt").textContent = s.rttMs === null ? "-" : s.rttMs.toFixed(1) + " ms";
    $("packets").textContent = s.packetsReceived + " / " + s.packetsLost;
    $("jitter").textContent = s.jitterMs === null ? "-" : s.jitterMs.toFixed(1) + " ms";
  },

  // Records `seconds` of the echoed audio and, on the same clock, of the
  // microphone; resolves to both as 16-bit mono PCM in base64 (comparing the two
  // gives the echo's delay).
  async record(seconds) {
    const ctx = new AudioContext();
    await ctx.resume();
    const merger = ctx.createChannelMerger(2);
    const echo = ctx.createMediaStreamSource(this.remote);
    const mic = ctx.createMediaStreamSource(this.mic);
    echo.connect(merger, 0, 0);
    mic.connect(merger, 0, 1);
    const tap = ctx.createScriptProcessor(4096, 2, 1);
    const sink = ctx.createGain();
    sink.gain.value = 0;
    const chunks = [[], []];
    tap.onaudioprocess = (ev) => {
      for (const ch of [0, 1]) chunks[ch].push(new Float32Array(ev.inputBuffer.getChannelData(ch)));
    };
    merger.connect(tap);
    tap.connect(sink);
    sink.connect(ctx.destination);
    await new Promise((r) => setTimeout(r, seconds * 1000));
    merger.disconnect();
    tap.disconnect();
    const sampleRate = ctx.sampleRate;
    await ctx.close();
    const encode = (parts) => {
      const total = parts.reduce((n, c) => n + c.length, 0);
      const pcm = new Int16Array(total);
      let at = 0;
      for (const c of parts) for (let i = 0; i < c.length; i++, at++)
        pcm[at] = Math.max(-32768, Math.min(32767, Math.round(c[i] * 32767)));
      const bytes = new Uint8Array(pcm.buffer);
      let binary = "";
      for (let i = 0; i < bytes.length; i += 0x8000)
        binary += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
      return btoa(binary);
    };
    return { sampleRate, pcm: encode(chunks[0]), mic: encode(chunks[1]) };
  },

  async stop() {
    clearInterval(this.timer);
    if (this.pc) this.pc.close();
    if (this.mic) for (const t of this.mic.getTracks()) t.stop();
    this.pc = null;
    this.mic = null;
    if (this.session !== null) {
      await fetch("/v1/webrtc/sessions/" + this.session, {
        method: "DELETE",
        headers: { "Authorization": "Bearer " + $("token").value.trim() },
      }).catch(() => {});
    }
    this.session = null;
    $("start").disabled = false;
    $("stop").disabled = true;
    this.setState("idle");
  },

  // Everything a test needs in one call: start silently with raw audio, record,
  // collect statistics, stop.
  async run(seconds) {
    try {
      await this.start({ raw: true, muted: true });
      const recording = await this.record(seconds);
      const stats = await this.stats();
      const session = this.session;
      await this.stop();
      return { ok: true, session, stats, ...recording };
    } catch (e) {
      this.fail(e);
      return { ok: false, error: this.error, state: this.state };
    }
  },
};
window.echoTest = echoTest;
$("start").onclick = () => echoTest.start().catch((e) => echoTest.fail(e));
$("stop").onclick = () => echoTest.stop();
