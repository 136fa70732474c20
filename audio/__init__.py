"""Sound only: frames, codecs, resampling, VAD, WAV files and sound devices.

This package imports nothing from ``runtime``.
"""
