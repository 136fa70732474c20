"""The conversation core: audio in -> VAD -> STT -> end of turn -> endpoint -> TTS -> audio out."""
