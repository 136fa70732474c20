// Agent audio playback with a small jitter buffer.
//
// Messages in (port):
//   {type: "audio", reply, pcm: ArrayBuffer}  24 kHz PCM16 of reply `reply`
//   {type: "end", reply}                      the reply has no more audio (play out the rest)
//   {type: "clear"}                           silence now: drop everything queued
//   {type: "tap", on: bool}                   copy what is played to the page (off: flush)
// Messages out:
//   {type: "started", reply}                  the first sample of `reply` was rendered
//   {type: "drained", reply}                  the last queued sample of an ended reply was rendered
//   {type: "cleared", samples}                how many queued samples a clear dropped
//   {type: "tap", samples: ArrayBuffer}       Float32 at the context rate (when tapping)
//
// A clear takes effect in the render quantum after the message arrives: nothing
// queued before it is rendered afterwards. Playback starts once prebufferMs is
// queued (or the reply has ended) and after an underrun waits for that again.
import { Resampler } from "./resampler.js";

const SOURCE_RATE = 24000;

class PlaybackProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = options.processorOptions || {};
    this.prebuffer = Math.round((sampleRate * (opts.prebufferMs || 60)) / 1000);
    this.queue = []; // {reply, samples: Float32Array, offset}
    this.queued = 0;
    this.playing = false;
    this.ended = new Set();
    this.started = new Set();
    this.current = null;
    this.resampler = new Resampler(SOURCE_RATE, sampleRate);
    this.tapping = false;
    this.tapBuf = new Float32Array(8192);
    this.tapFill = 0;
    this.port.onmessage = (e) => this.onMessage(e.data);
  }

  onMessage(msg) {
    if (msg.type === "audio") {
      if (this.current !== msg.reply) {
        this.resampler = new Resampler(SOURCE_RATE, sampleRate);
        this.current = msg.reply;
      }
      const pcm = new Int16Array(msg.pcm);
      const f = new Float32Array(pcm.length);
      for (let i = 0; i < pcm.length; i++) f[i] = pcm[i] / 32768;
      const samples = this.resampler.push(f);
      if (samples.length) {
        this.queue.push({ reply: msg.reply, samples, offset: 0 });
        this.queued += samples.length;
      }
    } else if (msg.type === "end") {
      this.ended.add(msg.reply);
      if (!this.queue.some((q) => q.reply === msg.reply)) {
        this.port.postMessage({ type: "drained", reply: msg.reply });
      }
    } else if (msg.type === "clear") {
      const dropped = this.queued;
      this.queue = [];
      this.queued = 0;
      this.playing = false;
      this.resampler = new Resampler(SOURCE_RATE, sampleRate);
      this.current = null;
      this.port.postMessage({ type: "cleared", samples: dropped });
    } else if (msg.type === "tap") {
      this.tapping = !!msg.on;
      if (!this.tapping && this.tapFill) this.flushTap();
    }
  }

  process(_inputs, outputs) {
    const out = outputs[0][0];
    out.fill(0);
    if (!this.playing) {
      const last = this.queue.length ? this.queue[this.queue.length - 1].reply : null;
      if (this.queued >= this.prebuffer || (last !== null && this.ended.has(last))) {
        this.playing = this.queued > 0;
      }
    }
    let i = 0;
    while (this.playing && i < out.length && this.queue.length) {
      const head = this.queue[0];
      if (!this.started.has(head.reply)) {
        this.started.add(head.reply);
        this.port.postMessage({ type: "started", reply: head.reply });
      }
      const n = Math.min(out.length - i, head.samples.length - head.offset);
      out.set(head.samples.subarray(head.offset, head.offset + n), i);
      head.offset += n;
      i += n;
      this.queued -= n;
      if (head.offset === head.samples.length) {
        this.queue.shift();
        const next = this.queue[0];
        if (this.ended.has(head.reply) && (!next || next.reply !== head.reply)) {
          this.port.postMessage({ type: "drained", reply: head.reply });
        }
      }
    }
    if (this.playing && !this.queue.length) this.playing = false; // underrun: buffer again
    for (let c = 1; c < outputs[0].length; c++) outputs[0][c].set(out);
    if (this.tapping) this.tap(out);
    return true;
  }

  flushTap() {
    const samples = this.tapBuf.slice(0, this.tapFill).buffer;
    this.port.postMessage({ type: "tap", samples }, [samples]);
    this.tapFill = 0;
  }

  tap(block) {
    if (this.tapFill + block.length > this.tapBuf.length) this.flushTap();
    this.tapBuf.set(block, this.tapFill);
    this.tapFill += block.length;
  }
}

registerProcessor("vx-playback", PlaybackProcessor);
