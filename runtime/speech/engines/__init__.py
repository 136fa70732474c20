"""Speech engines: embedded (offline) and remote implementations of the STT/TTS ports."""
