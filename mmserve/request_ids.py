"""Request ids: what a client may send, and how any id is written to a log line (never raw)."""

from __future__ import annotations

import re

MAX_CHARS = 128
# A safe alphabet: an id reaches log lines and other services, so none can forge or flood a log line.
_VALID = re.compile(r"[A-Za-z0-9._:\-]{1,%d}" % MAX_CHARS)
_UNSAFE = re.compile(r"[^A-Za-z0-9._:\-]")


def is_valid(request_id: str) -> bool:
    """Whether a client's request id is acceptable: 1 to MAX_CHARS letters, digits and ._:- characters."""
    return bool(_VALID.fullmatch(request_id))


def for_log(request_id: str) -> str:
    """The id as a log line may show it: itself when valid, else a short sanitised prefix marked as such."""
    if not request_id:
        return "-"
    if is_valid(request_id):
        return request_id
    return "invalid:" + _UNSAFE.sub("?", request_id[:32])
