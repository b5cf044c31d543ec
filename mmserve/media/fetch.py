"""Resolves a media URI to bytes under a policy: file:// confined to a media root, http(s) with SSRF checks."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import ipaddress
import logging
import os
import pathlib
import re
import socket
import urllib.parse

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from mmserve.media.errors import MediaError

log = logging.getLogger(__name__)

SCHEMES = ("file", "http", "https")
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CHUNK_BYTES = 64 * 1024
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
# 6to4 and NAT64 addresses embed an IPv4 address that the traffic finally reaches.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


@dataclasses.dataclass(frozen=True)
class FetchPolicy:
    """What a media URI may point at and how much of it may be read."""

    media_root: str = ""  # file:// URIs must lie under it; empty disables file://
    max_bytes: int = 200 * 1024 * 1024
    timeout_s: float = 10.0  # for the whole fetch, redirects included
    max_redirects: int = 3
    allow_private: bool = False  # allow loopback, private, link-local, ... targets (tests, trusted networks)

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.timeout_s <= 0 or self.max_redirects < 0:
            raise ValueError("max_bytes, timeout_s: must be positive; max_redirects: not negative")


@dataclasses.dataclass(frozen=True)
class MediaFile:
    """A file under the media root, read where it lies: hashed by the router in constant memory and decoded by a
    decoder that mounts the same root, its bytes never sent (a long clip costs the router no memory)."""

    uri: str  # as the client named it: the decoder resolves it again, and its messages never name a link's target
    path: pathlib.Path
    size: int
    mtime_ns: int
    sha256: str


def uri_scheme(uri: str) -> str:
    """The URI's scheme in lower case ("" when it names none)."""
    scheme = _SCHEME.match(uri)
    return scheme.group(1).lower() if scheme else ""


def _version(stat: os.stat_result) -> tuple[int, int]:
    """What tells a file's contents apart cheaply: its size and modification time."""
    return stat.st_size, stat.st_mtime_ns


def hash_file_uri(uri: str, *, media_root: str, max_bytes: int) -> MediaFile:
    """The file a file:// URI names, with the sha256 of its bytes; MediaError when refused or changed meanwhile."""
    path = resolve_file_uri(uri, media_root=media_root, max_bytes=max_bytes)
    try:
        with path.open("rb") as f:
            before = os.fstat(f.fileno())
            digest = hashlib.file_digest(f, "sha256").hexdigest()
            after = os.fstat(f.fileno())
    except OSError as err:
        log.info("reading %s failed: %s", path, err)
        raise MediaError(f"uri: {_short(uri)} cannot be read") from None
    if _version(before) != _version(after):
        raise MediaError(f"uri: {_short(uri)} changed while it was read")
    if after.st_size > max_bytes:  # it grew after the check
        raise MediaError(f"uri: {_short(uri)} is larger than the {max_bytes} byte limit")
    return MediaFile(uri, path, after.st_size, after.st_mtime_ns, digest)


def check_unchanged(path: pathlib.Path, uri: str, *, size: int, mtime_ns: int) -> None:
    """MediaError unless the file is still the size and age its reader saw (size 0: unchecked)."""
    if not size:
        return
    try:
        stat = path.stat()
    except OSError:  # gone since it was resolved
        stat = None
    if stat is None or _version(stat) != (size, mtime_ns):
        raise MediaError(f"uri: {_short(uri)} changed after the router read it")


def resolve_file_uri(uri: str, *, media_root: str, max_bytes: int) -> pathlib.Path:
    """The file a file:// URI names, checked against the media root and the size limit."""
    try:
        parsed = urllib.parse.urlparse(uri)
    except ValueError as err:
        raise MediaError(f"uri: malformed URL ({err})") from None
    if parsed.scheme in ("http", "https"):
        raise MediaError(f"uri: fetching {parsed.scheme}:// URLs is not enabled on this server")
    if parsed.scheme != "file":
        raise MediaError(f"uri: unsupported scheme {parsed.scheme!r} (expected file://, http:// or https://)")
    if parsed.netloc not in ("", "localhost"):
        raise MediaError(f"uri: file:// URIs must not name a host ({parsed.netloc!r})")
    if not media_root:
        raise MediaError("uri: file:// URIs are disabled (no media root configured)")
    # The client's own path in every message: never the resolved target of a symlink, and the same answer for a
    # path outside the root whether or not it exists there.
    named = _short(uri)
    root = pathlib.Path(media_root).resolve()
    path = pathlib.Path(urllib.parse.unquote(parsed.path)).resolve()
    if not path.is_relative_to(root):
        log.info("file uri %s resolves to %s, outside the media root %s", named, path, root)
        raise MediaError(f"uri: {named} is outside the media root")
    if not path.is_file():
        raise MediaError(f"uri: no such file {named} under the media root")
    if path.stat().st_size > max_bytes:
        raise MediaError(f"uri: {named} is larger than the {max_bytes} byte limit")
    return path


def blocked_reason(address: str) -> str | None:
    """Why an IP address is not a public target ("loopback", "private", ...), or None when it is."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (
            ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in _NAT64 else None)
        if embedded is not None:
            reason = blocked_reason(str(embedded))
            return reason and f"{reason}, as IPv4 {embedded}"
    for reason in ("loopback", "link_local", "multicast", "unspecified", "reserved", "private"):
        if getattr(ip, f"is_{reason}"):
            return reason.replace("_", "-")
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return "site-local"
    if not ip.is_global:  # e.g. 100.64.0.0/10 (carrier-grade NAT)
        return "non-global"
    return None


def _short(url: str | URL) -> str:
    """A URL cut to a length fit for an error message."""
    text = str(url)
    return text if len(text) <= 200 else text[:200] + "..."


class _Refused(MediaError):
    """A target the policy forbids; raised from inside aiohttp and passed through untouched."""


def _check_address(host: str, address: str) -> None:
    reason = blocked_reason(address)
    if reason is not None:
        named = host if host == address else f"{host} ({address})"
        raise _Refused(f"uri: refusing to fetch from {named}: not a public address ({reason})")


class CheckedResolver(AbstractResolver):
    """Resolves with the system resolver and refuses the host if any of its addresses is not public.

    aiohttp connects only to the addresses returned here, so a name that re-resolves to a private
    address (DNS rebinding) is caught on every connection, redirects included."""

    def __init__(self, inner: AbstractResolver | None = None):
        self.inner = inner or aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self.inner.resolve(host, port, family)
        for result in results:
            _check_address(host, result["host"])
        return results

    async def close(self) -> None:
        await self.inner.close()


def _parse_http(uri: str | URL) -> URL:
    """uri as a URL, if it is a well-formed http(s) URL."""
    try:
        url = URL(uri) if isinstance(uri, str) else uri
        host = url.host
    except (ValueError, TypeError) as err:
        raise MediaError(f"uri: malformed URL ({err})") from None
    if url.scheme not in ("http", "https"):
        raise MediaError(f"uri: unsupported scheme {url.scheme!r} (expected file://, http:// or https://)")
    if not host or any(c.isspace() or c in "<>\\^`{|}" for c in host):
        raise MediaError(f"uri: malformed URL {_short(url)!r} ({'a bad host name' if host else 'no host'})")
    return url


def _redirect_target(url: URL, location: str) -> URL:
    try:
        target = url.join(URL(location))
    except ValueError as err:
        raise MediaError(f"uri: {_short(url)} redirected to a malformed URL ({err})") from None
    return _parse_http(target)


def _check_literal_host(url: URL) -> None:
    """An IP-literal host never reaches the resolver, so it is checked here."""
    try:
        ipaddress.ip_address(url.host.split("%", 1)[0])
    except ValueError:
        return  # a name: the resolver checks what it resolves to
    _check_address(url.host, url.host)


async def _read_body(response: aiohttp.ClientResponse, url: URL, max_bytes: int) -> bytes:
    length = response.content_length
    if length is not None and length > max_bytes:
        raise MediaError(f"uri: {_short(url)} is {length} bytes, over the {max_bytes} byte limit")
    body = bytearray()
    async for chunk in response.content.iter_chunked(_CHUNK_BYTES):
        body += chunk
        if len(body) > max_bytes:
            raise MediaError(f"uri: {_short(url)} is larger than the {max_bytes} byte limit")
    return bytes(body)


async def _fetch_http(uri: str, policy: FetchPolicy) -> bytes:
    url = _parse_http(uri)
    connector = aiohttp.TCPConnector(resolver=None if policy.allow_private else CheckedResolver(),
                                     use_dns_cache=False, force_close=True)
    # auto_decompress off: a gzip Content-Encoding must not inflate past max_bytes unseen.
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False, trust_env=False,
                                     headers={"Accept-Encoding": "identity"}) as session:
        for _ in range(policy.max_redirects + 1):
            if not policy.allow_private:
                _check_literal_host(url)
            async with session.get(url, allow_redirects=False) as response:
                if response.status in _REDIRECTS and "Location" in response.headers:
                    url = _redirect_target(url, response.headers["Location"])
                    continue
                if not 200 <= response.status < 300:
                    reason = f" {response.reason}" if response.reason else ""
                    raise MediaError(f"uri: {_short(url)} answered HTTP {response.status}{reason}")
                return await _read_body(response, url, policy.max_bytes)
    raise MediaError(f"uri: {_short(uri)} redirected more than {policy.max_redirects} times")


async def fetch_uri(uri: str, *, policy: FetchPolicy) -> bytes:
    """The bytes behind a file://, http:// or https:// URI; MediaError naming the problem when refused."""
    scheme = uri_scheme(uri)
    if not scheme:
        raise MediaError(f"uri: {_short(uri)!r} is not a URL (expected file://, http:// or https://)")
    if scheme not in SCHEMES:
        raise MediaError(f"uri: unsupported scheme {scheme!r} (expected file://, http:// or https://)")
    if scheme == "file":
        path = await asyncio.to_thread(resolve_file_uri, uri, media_root=policy.media_root,
                                       max_bytes=policy.max_bytes)
        data = await asyncio.to_thread(path.read_bytes)
        if len(data) > policy.max_bytes:  # the file grew after the check
            raise MediaError(f"uri: {_short(uri)} is larger than the {policy.max_bytes} byte limit")
        return data
    try:
        async with asyncio.timeout(policy.timeout_s):
            return await _fetch_http(uri, policy)
    except TimeoutError:
        raise MediaError(f"uri: fetching {_short(uri)} timed out after {policy.timeout_s:g} s") from None
    except aiohttp.InvalidURL as err:
        raise MediaError(f"uri: malformed URL ({err})") from None
    except aiohttp.ClientConnectorDNSError as err:
        raise MediaError(f"uri: cannot resolve the host of {_short(uri)} ({err.os_error})") from None
    except (aiohttp.ClientError, OSError) as err:
        # The library's own words go to the log only: they can name internals the client has no use for.
        log.info("fetching %s failed: %s: %s", _short(uri), type(err).__name__, err)
        raise MediaError(f"uri: fetching {_short(uri)} failed (the server could not be reached or broke off)") from None
