"""Resolves a media URI to bytes under the configured policy (file:// confined to a media root)."""

from __future__ import annotations

import pathlib
import urllib.parse

from mmserve.media.preprocess import MediaError


def resolve_file_uri(uri: str, *, media_root: str, max_bytes: int) -> pathlib.Path:
    """The file a file:// URI names, checked against the media root and the size limit."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme in ("http", "https"):
        raise MediaError(f"uri: fetching {parsed.scheme}:// URLs is not enabled on this server")
    if parsed.scheme != "file":
        raise MediaError(f"uri: unsupported scheme {parsed.scheme!r} (expected file://, http:// or https://)")
    if not media_root:
        raise MediaError("uri: file:// URIs are disabled (no media root configured)")
    root = pathlib.Path(media_root).resolve()
    path = pathlib.Path(urllib.parse.unquote(parsed.path)).resolve()
    if not path.is_relative_to(root):
        raise MediaError(f"uri: {path} is outside the media root")
    if not path.is_file():
        raise MediaError(f"uri: no such file {path}")
    if path.stat().st_size > max_bytes:
        raise MediaError(f"uri: {path} is larger than the {max_bytes} byte limit")
    return path


def read_uri(uri: str, *, media_root: str, max_bytes: int) -> bytes:
    """The bytes behind uri; MediaError naming the problem when the policy or the file says no."""
    return resolve_file_uri(uri, media_root=media_root, max_bytes=max_bytes).read_bytes()
