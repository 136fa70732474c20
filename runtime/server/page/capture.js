// Microphone capture: the context's rate → 24 kHz PCM16 chunks for `input.audio`.
//
// Posts {pcm: ArrayBuffer (Int16, little-endian, 24 kHz mono), rms: 0..1} every
// chunkMs of output audio, whatever rate the device and the AudioContext run at.
import { Resampler } from "./resampler.js";

class CaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = options.processorOptions || {};
    this.rate = opts.targetRate || 24000;
    this.chunk = Math.round((this.rate * (opts.chunkMs || 20)) / 1000);
    this.resampler = new Resampler(sampleRate, this.rate);
    this.pending = new Int16Array(this.chunk);
    this.filled = 0;
    this.energy = 0;
  }

  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (!channel) return true;
    const out = this.resampler.push(channel);
    for (let i = 0; i < out.length; i++) {
      const v = Math.max(-1, Math.min(1, out[i]));
      this.energy += v * v;
      this.pending[this.filled++] = v < 0 ? Math.round(v * 32768) : Math.round(v * 32767);
      if (this.filled === this.chunk) {
        const pcm = this.pending.slice().buffer;
        const rms = Math.sqrt(this.energy / this.chunk);
        this.port.postMessage({ pcm, rms }, [pcm]);
        this.filled = 0;
        this.energy = 0;
      }
    }
    return true;
  }
}

registerProcessor("vx-capture", CaptureProcessor);
