"""Microphone and speaker through sounddevice (PortAudio), bridged into asyncio.

Theory of operation
-------------------
PortAudio calls our callbacks on its own real-time thread. They never block
and never touch asyncio objects directly:

* :class:`Microphone`: the input callback copies the block into a
  lock-protected hand-over list and wakes the event loop with
  ``call_soon_threadsafe`` only when no wake-up is pending, so a stalled loop
  (or a device calling back faster than real time) never floods the loop's
  wake-up socket; a signal written to a full one is lost. On the loop the
  blocks go into a bounded queue. When the consumer is too slow the **oldest**
  frame is dropped (live audio: the newest is what matters) and ``statistics().dropped`` counts it.
* :class:`Speaker`: the output callback pulls from a lock-protected byte
  buffer; when the buffer runs dry it plays silence (an underrun, counted) —
  never garbage or a stall. ``played_samples`` is the playout position: how
  much of the agent's audio has actually gone out (barge-in uses it to know
  what the user heard). It wakes the loop once when the buffer empties, not on
  every silent block. :meth:`Speaker.write` applies backpressure at a
  high-water mark; :meth:`Speaker.clear_buffer` drops what is queued at once.

The stream classes are injectable (``stream_factory``) so the bridging logic is
tested without a sound card; the module imports without PortAudio and raises
:class:`DeviceUnavailable` with a clear message only when a device is opened.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol, Self

from audio.frame import AudioFrame, check_pcm, check_rate


class DeviceUnavailable(RuntimeError):
    """PortAudio or the requested sound device is not available."""


def _sounddevice() -> ModuleType:
    try:
        import sounddevice
    except OSError as exc:  # the PortAudio shared library is missing
        raise DeviceUnavailable(
            "PortAudio is not installed (Debian/Ubuntu: apt-get install libportaudio2; "
            f"macOS: brew install portaudio): {exc}"
        ) from None
    module: ModuleType = sounddevice
    return module


def _device_time(info: Any, field: str) -> float:
    """PortAudio's time stamp ``field`` of a callback, or the monotonic clock.

    PortAudio reports when a block is captured (``inputBufferAdcTime``) or
    reaches the DAC (``outputBufferDacTime``: now plus the device's output
    latency) on the stream's clock, which is the monotonic clock on Linux;
    hosts that report nothing (0) fall back to now.
    """
    value = getattr(info, field, 0.0) if info is not None else 0.0
    return float(value) if value else time.monotonic()


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    index: int
    name: str
    max_input_channels: int
    max_output_channels: int
    default_samplerate: float


def list_devices() -> list[DeviceInfo]:
    """All sound devices PortAudio knows.

    Raises:
        DeviceUnavailable: PortAudio is missing.
    """
    sd = _sounddevice()
    return [
        DeviceInfo(
            index=int(d["index"]),
            name=str(d["name"]),
            max_input_channels=int(d["max_input_channels"]),
            max_output_channels=int(d["max_output_channels"]),
            default_samplerate=float(d["default_samplerate"]),
        )
        for d in sd.query_devices()
    ]


def find_device(spec: int | str | None, kind: str) -> int | None:
    """Resolve a device by index or (case-insensitive substring of its) name.

    Args:
        spec: index, name, or ``None`` for the system default.
        kind: ``"input"`` or ``"output"``.

    Raises:
        DeviceUnavailable: no such device, or it has no channels of that kind.
    """
    if spec is None:
        return None
    devices = list_devices()
    key = "max_input_channels" if kind == "input" else "max_output_channels"
    if isinstance(spec, int) or (isinstance(spec, str) and spec.isdigit()):
        index = int(spec)
        match = [d for d in devices if d.index == index]
    else:
        match = [d for d in devices if spec.lower() in d.name.lower()]
    match = [d for d in match if getattr(d, key) > 0]
    if not match:
        names = ", ".join(f"{d.index}: {d.name}" for d in devices if getattr(d, key) > 0)
        raise DeviceUnavailable(f"no {kind} device matches {spec!r} (available: {names or 'none'})")
    return match[0].index


class RawStream(Protocol):
    """The part of ``sounddevice.RawInputStream``/``RawOutputStream`` we use."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def close(self) -> None: ...


StreamFactory = Callable[..., RawStream]


def _open_stream(
    kind: str,
    factory: StreamFactory | None,
    device: int | str | None,
    rate: int,
    block: int,
    callback: Callable[..., None],
) -> RawStream:
    """Open and start a raw int16 mono stream (``kind`` is "input" or "output").

    Raises:
        DeviceUnavailable: PortAudio or the device is missing, or the stream fails to open.
    """
    resolved: int | str | None = device
    if factory is None:
        sd = _sounddevice()
        factory = sd.RawInputStream if kind == "input" else sd.RawOutputStream
        resolved = find_device(device, kind)
    try:
        stream = factory(
            samplerate=rate, blocksize=block, channels=1, dtype="int16", device=resolved,
            callback=callback,
        )  # fmt: skip
        stream.start()
    except DeviceUnavailable:
        raise
    except Exception as exc:
        raise DeviceUnavailable(f"cannot open the {kind} device: {exc}") from None
    return stream


@dataclass(frozen=True, slots=True)
class MicrophoneStatistics:
    frames: int
    dropped: int
    queued: int
    overflows: int
    process_errors: int = 0


class Microphone:
    """Async iterator of :class:`AudioFrame` from an input device.

    Args:
        device: index, name or ``None`` (default device).
        sample_rate: capture rate (the device resamples if needed).
        frame_ms: block size delivered per frame.
        max_queued: bound of the queue between PortAudio and the consumer.
        stream_factory: ``sounddevice.RawInputStream`` by default.
        process: runs on PortAudio's thread on each block, with the device
            time (seconds) its first sample was captured, and returns the
            block to deliver (echo cancellation: :meth:`audio.echo.EchoPath.captured`).
            If it raises, the block is delivered unprocessed and
            ``statistics().process_errors`` counts it.
    """

    def __init__(
        self,
        device: int | str | None = None,
        *,
        sample_rate: int = 16000,
        frame_ms: int = 20,
        max_queued: int = 25,
        stream_factory: StreamFactory | None = None,
        process: Callable[[bytes, float], bytes] | None = None,
    ) -> None:
        self._device = device
        self._rate = check_rate(sample_rate)
        self._block = sample_rate * frame_ms // 1000
        self._process = process
        self._process_errors = 0
        if max_queued < 1:
            raise ValueError("max_queued must be at least 1")
        self._queue: deque[AudioFrame] = deque()
        self._max = max_queued
        self._factory = stream_factory
        self._stream: RawStream | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = asyncio.Event()
        self._pts = 0
        self._frames = 0
        self._dropped = 0
        self._overflows = 0
        self._closed = False
        # Hand-over from PortAudio's thread: blocks (with their overflow flags) not
        # yet on the loop, how many older ones were dropped there, and whether a
        # wake-up of the loop is pending.
        self._handover_lock = threading.Lock()
        self._handover: deque[tuple[bytes, bool]] = deque()
        self._handover_dropped = 0
        self._handover_dropped_samples = 0
        self._wake_pending = False

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Open and start the input stream.

        Raises:
            DeviceUnavailable: PortAudio or the device is missing.
        """
        self._loop = asyncio.get_running_loop()
        self._stream = _open_stream(
            "input", self._factory, self._device, self._rate, self._block, self._callback
        )

    def close(self) -> None:
        self._closed = True
        if self._stream is not None:
            self._stream.stop()
            self._stream.close()
            self._stream = None
        self._ready.set()

    # PortAudio's thread.
    def _callback(self, indata: Any, frames: int, time: Any, status: Any) -> None:
        data = bytes(indata)
        if self._process is not None:
            try:
                data = self._process(data, _device_time(time, "inputBufferAdcTime"))
            except Exception:
                self._process_errors += 1
        overflow = bool(status) and bool(getattr(status, "input_overflow", False))
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with self._handover_lock:
            self._handover.append((data, overflow))
            if len(self._handover) > self._max:
                # The loop is behind: the oldest block goes, as in the queue.
                old, _ = self._handover.popleft()
                self._handover_dropped += 1
                self._handover_dropped_samples += len(old) // 2
            if self._wake_pending:
                return
            self._wake_pending = True
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(self._take)

    # The event loop's thread.
    def _take(self) -> None:
        with self._handover_lock:
            blocks = list(self._handover)
            self._handover.clear()
            dropped = self._handover_dropped
            dropped_samples = self._handover_dropped_samples
            self._handover_dropped = self._handover_dropped_samples = 0
            self._wake_pending = False
        if self._closed:
            return
        # Dropped blocks were older than those handed over: they still advance the clock.
        self._pts += dropped_samples
        self._frames += dropped
        self._dropped += dropped
        for data, overflow in blocks:
            self._push(data, overflow)

    def _push(self, data: bytes, overflow: bool) -> None:
        if overflow:
            self._overflows += 1
        frame = AudioFrame(pcm=data, sample_rate=self._rate, pts=self._pts)
        self._pts += frame.samples
        self._frames += 1
        if len(self._queue) >= self._max:
            self._queue.popleft()
            self._dropped += 1
        self._queue.append(frame)
        self._ready.set()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> AudioFrame:
        while not self._queue:
            if self._closed:
                raise StopAsyncIteration
            self._ready.clear()
            await self._ready.wait()
        return self._queue.popleft()

    def statistics(self) -> MicrophoneStatistics:
        return MicrophoneStatistics(
            frames=self._frames,
            dropped=self._dropped,
            queued=len(self._queue),
            overflows=self._overflows,
            process_errors=self._process_errors,
        )


@dataclass(frozen=True, slots=True)
class SpeakerStatistics:
    played_samples: int
    buffered_samples: int
    underruns: int


class Speaker:
    """Plays PCM16 on an output device, paced by the device.

    Args:
        device: index, name or ``None`` (default device).
        sample_rate: playback rate.
        block_ms: device callback block size.
        high_water_ms: :meth:`write` waits while more than this is buffered.
        stream_factory: ``sounddevice.RawOutputStream`` by default.
        on_played: runs on PortAudio's thread with exactly each block handed
            to the device (silence included), its rate, and the device time
            (seconds) its first sample reaches the DAC — the far-end
            reference for :meth:`audio.echo.EchoPath.played`.
    """

    def __init__(
        self,
        device: int | str | None = None,
        *,
        sample_rate: int = 24000,
        block_ms: int = 20,
        high_water_ms: int = 200,
        stream_factory: StreamFactory | None = None,
        on_played: Callable[[bytes, int, float], None] | None = None,
    ) -> None:
        self._on_played = on_played
        self._device = device
        self._rate = check_rate(sample_rate)
        self._block = sample_rate * block_ms // 1000
        self._high = sample_rate * high_water_ms // 1000 * 2
        self._factory = stream_factory
        self._lock = threading.Lock()
        self._buf = bytearray()
        self._played = 0
        self._paused = False
        self._underruns = 0
        self._stream: RawStream | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drained = asyncio.Event()
        self._drained.set()
        # Whether the loop has been woken since the buffer last ran empty.
        self._empty_signalled = True

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    @property
    def sample_rate(self) -> int:
        return self._rate

    @property
    def played_samples(self) -> int:
        """Samples of written audio that have gone to the device (the playout position)."""
        with self._lock:
            return self._played

    def start(self) -> None:
        """Open and start the output stream.

        Raises:
            DeviceUnavailable: PortAudio or the device is missing.
        """
        self._loop = asyncio.get_running_loop()
        self._stream = _open_stream(
            "output", self._factory, self._device, self._rate, self._block, self._callback
        )

    def close(self) -> None:
        if self._stream is not None:
            self._stream.stop()
            self._stream.close()
            self._stream = None

    async def write(self, pcm: bytes) -> None:
        """Queue audio; waits while the buffer is above the high-water mark."""
        pcm = check_pcm(pcm)
        while True:
            with self._lock:
                if len(self._buf) < self._high:
                    self._buf += pcm
                    self._empty_signalled = False
                    self._drained.clear()
                    return
            await asyncio.sleep(self._block / self._rate)

    def clear_buffer(self) -> int:
        """Drop everything not yet played (barge-in; ends a pause). Returns the samples dropped."""
        with self._lock:
            dropped = len(self._buf) // 2
            self._buf.clear()
            self._paused = False
        self._drained.set()
        return dropped

    @property
    def paused(self) -> bool:
        with self._lock:
            return self._paused

    def pause(self) -> None:
        """Play silence from the next device block on; the queued audio is held.

        What the device already took (one block and its own latency) plays out
        and stays counted in :attr:`played_samples`.
        """
        with self._lock:
            self._paused = True

    def resume(self) -> None:
        """Play the held audio from where the pause stopped."""
        with self._lock:
            self._paused = False

    async def wait_for_playout(self) -> None:
        """Wait until everything written has been played."""
        await self._drained.wait()

    def statistics(self) -> SpeakerStatistics:
        with self._lock:
            return SpeakerStatistics(self._played, len(self._buf) // 2, self._underruns)

    # PortAudio's thread.
    def _callback(self, outdata: Any, frames: int, time: Any, status: Any) -> None:
        need = frames * 2
        with self._lock:
            take = 0 if self._paused else min(need, len(self._buf))
            chunk = bytes(self._buf[:take])
            del self._buf[:take]
            self._played += take // 2
            if 0 < take < need and not self._paused:
                # The buffer ran dry part-way through a block (a slow producer,
                # or simply the end of an utterance): the rest is silence.
                self._underruns += 1
            wake = not self._buf and not self._empty_signalled
            if wake:
                self._empty_signalled = True
        outdata[:take] = chunk
        outdata[take:need] = b"\x00" * (need - take)
        if self._on_played is not None:
            block = chunk + bytes(need - take)
            self._on_played(block, self._rate, _device_time(time, "outputBufferDacTime"))
        if wake and self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                self._loop.call_soon_threadsafe(self._mark_drained)

    def _mark_drained(self) -> None:
        # Runs on the loop later than the callback: audio may have been written since.
        with self._lock:
            empty = not self._buf
        if empty:
            self._drained.set()
