"""The two ways a TensorRef fails its consumer (no torch, no gRPC)."""


class TensorRefError(ValueError):
    """A TensorRef that does not describe a valid tensor (INVALID_ARGUMENT)."""


class TensorUnavailable(ConnectionError):
    """A well-formed TensorRef whose memory cannot be reached any more (UNAVAILABLE)."""
