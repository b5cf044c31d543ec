"""The error of bad media input, importable without torch."""


class MediaError(ValueError):
    """Bad or unsupported media input; the message says what is wrong in plain words."""
