"""Model checkpoints and builders used by mmserve."""
