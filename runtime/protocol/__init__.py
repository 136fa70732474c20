"""Pure wire-protocol codecs (no I/O)."""
