// The voxloop page: talk to a stored agent over the realtime WebSocket.
//
// Credentials come from the address's fragment (#agent=ID&token=TOKEN, minted by
// `voxloop agents link`), which never reaches a server log, and are removed from
// the address bar at once; or, when the server publishes a page for one agent, from
// POST /page/token. No API key ever reaches the browser.

const CAPTURE_RATE = 24000;
const RESUME_DELAYS_MS = [250, 500, 1000, 2000, 4000, 8000];

const $ = (id) => document.getElementById(id);
const ui = {
  state: $("state"), agent: $("agent"), start: $("start"), stop: $("stop"),
  level: $("level"), error: $("error"), transcript: $("transcript"),
  latency: $("latency").querySelector("tbody"),
};

// What tests and curious users can read (window.voxloop).
const page = {
  state: "idle",
  sessionId: null,
  events: [],          // server event types, in order
  latencies: [],       // ms, one per answered turn
  cleared: [],         // samples dropped by each playback clear
  drained: [],         // replies played to their end
  played: [],          // Float32Array blocks, when tapping
  sampleRate: null,
  tap(on) { playback && playback.port.postMessage({ type: "tap", on }); },
};
window.voxloop = page;

let agentId = null;
let token = null;
let ctx = null;
let capture = null;
let playback = null;
let micStream = null;
let ws = null;
let resumeToken = null;
let ended = false;
let ready = false;
let resumeAttempt = 0;
const cutReplies = new Set();
const lines = new Map();       // item_id / reply_id → <li>
let noiseFloor = 0.003;
let lastVoiceAt = 0;           // performance.now() of the last captured speech
let turnEndAt = null;          // when the user stopped speaking (the last voiced chunk)
let pendingTurn = null;        // the latency row waiting for the reply's first audio

function setState(state, text) {
  page.state = state;
  ui.state.dataset.state = state;
  ui.state.textContent = text;
}

function showError(text) {
  ui.error.textContent = text;
  ui.error.hidden = false;
}

function clearError() {
  ui.error.hidden = true;
  ui.error.textContent = "";
}

function readFragment() {
  const params = new URLSearchParams(location.hash.slice(1));
  if (location.hash) history.replaceState(null, "", location.pathname + location.search);
  return { agent: params.get("agent"), token: params.get("token") };
}

async function pageToken() {
  // Page-only mode: the server mints one short-lived token per visitor.
  const res = await fetch("/page/token", { method: "POST" });
  if (res.status === 404) return null;
  const body = await res.json().catch(() => ({}));
  if (!res.ok) {
    if (res.status === 429) throw new Error("Too many conversations were started from this address. Wait a minute and try again.");
    throw new Error(body.message || `The server refused to start a conversation (HTTP ${res.status}).`);
  }
  agentId = body.agent_id;
  return body.token;
}

// -- audio --------------------------------------------------------------------------

async function startAudio() {
  ctx = new AudioContext({ latencyHint: "interactive" });
  if (ctx.state !== "running") await ctx.resume().catch(() => {});
  if (ctx.state !== "running") {
    throw new Error("The browser did not let audio start. Click Start conversation to begin.");
  }
  page.sampleRate = ctx.sampleRate;
  try {
    micStream = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
    });
  } catch (err) {
    if (err && (err.name === "NotAllowedError" || err.name === "SecurityError")) {
      throw new Error("Microphone access was refused. Allow the microphone for this page and click Start conversation again.");
    }
    if (err && (err.name === "NotFoundError" || err.name === "OverconstrainedError")) {
      throw new Error("No microphone was found. Connect one and click Start conversation again.");
    }
    if (!navigator.mediaDevices) {
      throw new Error("This browser allows the microphone only on https:// pages or on localhost.");
    }
    throw new Error(`The microphone could not be opened (${err && err.name ? err.name : err}).`);
  }
  await ctx.audioWorklet.addModule("/page/capture.js");
  await ctx.audioWorklet.addModule("/page/playback.js");
  const source = ctx.createMediaStreamSource(micStream);
  capture = new AudioWorkletNode(ctx, "vx-capture", {
    numberOfOutputs: 0, processorOptions: { targetRate: CAPTURE_RATE, chunkMs: 20 },
  });
  capture.port.onmessage = (e) => onCaptured(e.data);
  source.connect(capture);
  playback = new AudioWorkletNode(ctx, "vx-playback", {
    numberOfInputs: 0, outputChannelCount: [1], processorOptions: { prebufferMs: 60 },
  });
  playback.port.onmessage = (e) => onPlayback(e.data);
  playback.connect(ctx.destination);
}

function onCaptured({ pcm, rms }) {
  const now = performance.now();
  // A slowly rising noise floor; speech is well above it.
  noiseFloor = rms < noiseFloor ? rms : noiseFloor * 1.002 + 1e-5;
  if (rms > Math.max(0.01, noiseFloor * 4)) lastVoiceAt = now;
  ui.level.style.width = `${Math.min(100, Math.round(Math.sqrt(rms) * 180))}%`;
  if (ready && ws && ws.readyState === WebSocket.OPEN) {
    send({ type: "input.audio", audio: base64(pcm) });
  }
}

function onPlayback(msg) {
  if (msg.type === "started") {
    if (pendingTurn && turnEndAt !== null) {
      const ms = Math.max(0, Math.round(performance.now() - turnEndAt));
      page.latencies.push(ms);
      pendingTurn.querySelector(".ms").textContent = `${ms} ms`;
      pendingTurn = null;
      turnEndAt = null;
    }
  } else if (msg.type === "drained") {
    page.drained.push(msg.reply);
  } else if (msg.type === "cleared") {
    page.cleared.push(msg.samples);
  } else if (msg.type === "tap") {
    page.played.push(new Float32Array(msg.samples));
  }
}

function base64(buffer) {
  const bytes = new Uint8Array(buffer);
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(s);
}

function unbase64(text) {
  const s = atob(text);
  const bytes = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) bytes[i] = s.charCodeAt(i);
  return bytes.buffer;
}

// -- the socket ----------------------------------------------------------------------

function socketUrl(credential) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}/v1/ws?token=${encodeURIComponent(credential)}`;
}

function send(event) {
  ws.send(JSON.stringify(event));
}

function connect(resuming) {
  setState(resuming ? "resuming" : "connecting", resuming ? "reconnecting…" : "connecting…");
  const socket = new WebSocket(socketUrl(resuming ? resumeToken : token));
  ws = socket;
  let opened = false;
  socket.onopen = () => {
    opened = true;
    if (resuming) send({ type: "session.resume", session_id: page.sessionId });
    else send({ type: "session.update", session: { agent_id: agentId } });
  };
  socket.onmessage = (e) => {
    let event;
    try { event = JSON.parse(e.data); } catch { return; }
    page.events.push(event.type);
    onEvent(event);
  };
  socket.onclose = () => {
    if (ws !== socket) return;
    ready = false;
    if (ended) return;
    if (page.sessionId && resumeToken && resumeAttempt < RESUME_DELAYS_MS.length) {
      const delay = RESUME_DELAYS_MS[resumeAttempt++];
      setState("resuming", "connection lost, reconnecting…");
      setTimeout(() => connect(true), delay);
      return;
    }
    if (!opened && !ui.error.textContent) showError("Cannot reach the voxloop server. Check that it is running and reload the page.");
    else if (!ui.error.textContent) showError("The connection to the server was lost.");
    finish("failed", "disconnected");
  };
}

const ERRORS = {
  unauthorized: "This link has already been used or has expired. Ask for a new link (voxloop agents link AGENT_ID).",
  session_forbidden: "This conversation belongs to someone else.",
  at_capacity: "The server is at capacity right now. Try again in a minute.",
  server_error: "The server could not start the conversation. Try again in a minute.",
  agent_not_found: "This agent does not exist (any more). Ask for a new link.",
  session_not_found: "The conversation has ended on the server and cannot be continued.",
  session_expired: "The conversation reached its time limit.",
};

function onEvent(event) {
  switch (event.type) {
    case "session.ready":
      ready = true;
      resumeAttempt = 0;
      page.sessionId = event.session_id;
      if (event.resume_token) resumeToken = event.resume_token;
      clearError();
      setState("live", "live — speak any time");
      break;
    case "session.updated":
      break;
    case "session.error": {
      const known = ERRORS[event.code];
      const text = known || (event.code === "agent_init_failed"
        ? `The agent could not start: ${event.message}`
        : `${event.message} (${event.code})`);
      if (event.code === "session_not_found" || event.code === "session_forbidden") resumeToken = null;
      showError(text);
      break;
    }
    case "reply.error":
      showError(`The agent's language model endpoint failed: ${event.message}`);
      break;
    case "session.ended":
      ended = true;
      finish("ended", "conversation ended");
      break;
    case "input.speech.started":
      // A real turn or an interruption (back-channels do not start one): silence now.
      playback && playback.port.postMessage({ type: "clear" });
      break;
    case "transcript.user.delta":
      userLine(event.item_id, event.text, true);
      break;
    case "input.speech.stopped":
      turnEndAt = lastVoiceAt || performance.now();
      break;
    case "transcript.user": {
      userLine(event.item_id, event.text, false);
      pendingTurn = latencyRow(event.item_id, event.text);
      break;
    }
    case "reply.started":
      agentLine(event.reply_id, "");
      break;
    case "reply.audio":
      if (cutReplies.has(event.reply_id)) break; // late audio of a cut reply is never played
      playback && playback.port.postMessage(
        { type: "audio", reply: event.reply_id, pcm: unbase64(event.data) });
      break;
    case "transcript.agent.delta": {
      const li = agentLine(event.reply_id);
      li.querySelector(".text").textContent += event.delta;
      break;
    }
    case "transcript.agent": {
      const li = agentLine(event.reply_id);
      li.querySelector(".text").textContent = event.text;
      if (event.interrupted) li.classList.add("interrupted");
      break;
    }
    case "reply.done":
      if (event.status === "interrupted") {
        cutReplies.add(event.reply_id);
        agentLine(event.reply_id).classList.add("interrupted");
        playback && playback.port.postMessage({ type: "clear" });
      } else {
        playback && playback.port.postMessage({ type: "end", reply: event.reply_id });
      }
      break;
    default:
      break;
  }
}

// -- the transcript ------------------------------------------------------------------

function line(key, who, cls) {
  let li = lines.get(key);
  if (!li) {
    li = document.createElement("li");
    li.className = cls;
    li.dataset.key = key;
    const name = document.createElement("span");
    name.className = "who";
    name.textContent = who;
    const text = document.createElement("span");
    text.className = "text";
    li.append(name, text);
    ui.transcript.append(li);
    lines.set(key, li);
  }
  return li;
}

function userLine(itemId, text, partial) {
  // The same item_id again (a partial, or a turn taken back and continued) replaces its line.
  const li = line(`user:${itemId}`, "You", "user");
  li.querySelector(".text").textContent = text;
  li.classList.toggle("partial", partial);
}

function agentLine(replyId, text) {
  const li = line(`agent:${replyId}`, "Agent", "agent");
  if (text !== undefined && !li.querySelector(".text").textContent) li.querySelector(".text").textContent = text;
  return li;
}

function latencyRow(itemId, text) {
  let row = ui.latency.querySelector(`tr[data-item="${CSS.escape(itemId)}"]`);
  if (!row) {
    row = document.createElement("tr");
    row.dataset.item = itemId;
    row.innerHTML = "<td class=n></td><td class=said></td><td class=ms>…</td>";
    row.querySelector(".n").textContent = String(ui.latency.children.length + 1);
    ui.latency.append(row);
  }
  row.querySelector(".said").textContent = text;
  return row;
}

// -- start and stop ------------------------------------------------------------------

function finish(state, text) {
  ready = false;
  setState(state, text);
  ui.stop.disabled = true;
  ui.start.disabled = state !== "failed";
  if (micStream) micStream.getTracks().forEach((t) => t.stop());
}

async function start() {
  ui.start.disabled = true;
  clearError();
  try {
    if (!token) token = await pageToken();
    if (!token || !agentId) {
      throw new Error("This page needs a link with a token: run `voxloop agents link AGENT_ID` where the server runs and open the link it prints.");
    }
    if (!ctx) await startAudio();
    ended = false;
    connect(false);
    token = null; // single use: a retry needs a new link
    ui.stop.disabled = false;
  } catch (err) {
    showError(err.message || String(err));
    setState("failed", "not connected");
    ui.start.disabled = false;
  }
}

function stop() {
  ended = true;
  if (ws && ws.readyState === WebSocket.OPEN) send({ type: "session.end" });
  finish("ended", "conversation ended");
}

const fragment = readFragment();
agentId = fragment.agent;
token = fragment.token;
ui.agent.textContent = agentId ? `Agent ${agentId}` : "";
ui.start.addEventListener("click", start);
ui.stop.addEventListener("click", stop);
