"""voxloop: a realtime voice-agent runtime that streams replies from your own endpoint."""

__version__ = "0.1.0"
