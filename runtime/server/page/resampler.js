// A streaming windowed-sinc resampler (mono, Float32), shared by both worklets.
//
// push(input) takes any number of samples at inRate and returns the samples at
// outRate that can be computed so far; state carries across calls, so a stream
// cut into blocks resamples exactly as one piece. When downsampling, the kernel's
// cut-off moves down to the output's Nyquist frequency (no aliasing).
export class Resampler {
  constructor(inRate, outRate, halfTaps = 8) {
    this.step = inRate / outRate;
    this.fc = Math.min(1, outRate / inRate);
    this.half = Math.ceil(halfTaps / this.fc);
    this.buf = new Float32Array(4096);
    this.len = 0; // samples held in buf
    this.base = -this.half; // absolute input index of buf[0] (a run-in of zeros)
    this.len = this.half;
    this.t = 0; // absolute input position of the next output sample
  }

  _append(input) {
    if (this.len + input.length > this.buf.length) {
      const grown = new Float32Array(Math.max(this.buf.length * 2, this.len + input.length));
      grown.set(this.buf.subarray(0, this.len));
      this.buf = grown;
    }
    this.buf.set(input, this.len);
    this.len += input.length;
  }

  _kernel(d) {
    if (d === 0) return this.fc;
    const x = Math.PI * this.fc * d;
    const w = 0.5 * (1 + Math.cos((Math.PI * d) / (this.half + 1)));
    return (this.fc * Math.sin(x) / x) * w;
  }

  push(input) {
    this._append(input);
    const out = [];
    const end = this.base + this.len; // one past the last input index held
    while (Math.floor(this.t) + this.half < end) {
      const centre = Math.floor(this.t);
      let acc = 0;
      for (let k = centre - this.half + 1; k <= centre + this.half; k++) {
        acc += this.buf[k - this.base] * this._kernel(this.t - k);
      }
      out.push(acc);
      this.t += this.step;
    }
    // Keep only what the next output sample still needs.
    const keepFrom = Math.floor(this.t) - this.half + 1;
    const drop = keepFrom - this.base;
    if (drop > 0) {
      this.buf.copyWithin(0, drop, this.len);
      this.len -= drop;
      this.base = keepFrom;
    }
    return Float32Array.from(out);
  }
}
