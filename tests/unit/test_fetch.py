"""fetch_uri against a real local HTTP server: SSRF refusals, redirects, size limits, timeouts, schemes."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import os
import socket

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver

from mmserve.media import fetch
from mmserve.media.fetch import (CheckedResolver, FetchPolicy, blocked_reason, check_unchanged, fetch_uri,
                                  hash_file_uri, uri_scheme)
from mmserve.media.preprocess import MediaError

BODY = bytes(range(256)) * 40  # 10,240 bytes
LOCAL = FetchPolicy(allow_private=True, max_bytes=64 * 1024, timeout_s=5.0, max_redirects=3)


class Server:
    """A real aiohttp server on 127.0.0.1 with a handler per behaviour under test."""

    def __init__(self):
        self.release = asyncio.Event()  # lets the slow handler finish at teardown
        self.runner: web.AppRunner | None = None
        self.port = 0

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/ok", self.ok)
        app.router.add_get("/chain/{n}", self.chain)
        app.router.add_get("/to", self.to)
        app.router.add_get("/stream", self.stream)
        app.router.add_get("/slow", self.slow)
        app.router.add_get("/gzip", self.gzipped)
        app.router.add_get("/teapot", self.teapot)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.release.set()
        await self.runner.cleanup()

    async def ok(self, request):
        return web.Response(body=BODY, content_type="application/octet-stream")

    async def chain(self, request):
        n = int(request.match_info["n"])
        raise web.HTTPFound("/ok" if n == 0 else f"/chain/{n - 1}")

    async def to(self, request):
        raise web.HTTPTemporaryRedirect(request.query["url"])

    async def stream(self, request):
        # Chunked, no Content-Length: only counting while reading can stop it.
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(int(request.query["chunks"])):
            await response.write(BODY)
        await response.write_eof()
        return response

    async def slow(self, request):
        await self.release.wait()
        return web.Response(body=b"late")

    async def gzipped(self, request):
        bomb = gzip.compress(bytes(8 * 1024 * 1024), mtime=0)
        return web.Response(body=bomb, headers={"Content-Encoding": "gzip"})

    async def teapot(self, request):
        return web.Response(status=418, text="no")


@pytest.fixture
async def server():
    s = Server()
    await s.start()
    yield s
    await s.stop()


async def refused(uri: str, policy: FetchPolicy = FetchPolicy()) -> str:
    with pytest.raises(MediaError) as info:
        await fetch_uri(uri, policy=policy)
    return str(info.value)


async def test_loopback_server_is_fetched_only_when_private_targets_are_allowed(server):
    assert await fetch_uri(server.url("/ok"), policy=LOCAL) == BODY
    message = await refused(server.url("/ok"))
    assert "refusing to fetch from 127.0.0.1" in message and "loopback" in message


async def test_a_hostname_resolving_to_loopback_is_refused(server):
    message = await refused(server.url("/ok", host="localhost"))
    assert "refusing to fetch from localhost" in message


@pytest.mark.parametrize("uri", ["http://127.0.0.1/", "http://10.0.0.1/", "http://169.254.169.254/latest/meta-data/",
                                 "http://[::1]/", "http://[::ffff:127.0.0.1]/", "http://[fe80::1]/",
                                 "http://0.0.0.0/", "https://192.168.1.1/", "http://[::]/", "http://0x7f.1/"])
async def test_private_literal_targets_are_refused_before_connecting(uri):
    assert "refusing to fetch from" in await refused(uri)


async def test_redirects_are_followed_up_to_the_limit(server):
    assert await fetch_uri(server.url("/chain/2"), policy=LOCAL) == BODY  # three redirects
    message = await refused(server.url("/chain/3"), LOCAL)
    assert "redirected more than 3 times" in message


@pytest.fixture
def origin_is_public(monkeypatch):
    """Treat exactly 127.0.0.1 as a public address, so the local server can stand in for a public origin."""
    real = blocked_reason
    monkeypatch.setattr(fetch, "blocked_reason", lambda address: None if address == "127.0.0.1" else real(address))


@pytest.mark.parametrize("target", ["http://127.0.0.2:{port}/ok", "http://[::1]:{port}/ok", "http://10.0.0.7/",
                                    "http://169.254.169.254/latest/meta-data/", "http://[::ffff:10.0.0.7]/"])
async def test_a_redirect_to_a_private_target_is_refused(server, origin_is_public, target):
    policy = FetchPolicy(max_redirects=3, timeout_s=5.0)
    assert await fetch_uri(server.url("/ok"), policy=policy) == BODY  # the public origin itself is fine
    uri = server.url("/to") + "?url=" + target.format(port=server.port)
    assert "refusing to fetch from" in await refused(uri, policy)


async def test_a_redirect_to_another_scheme_is_refused(server):
    message = await refused(server.url("/to") + "?url=file:///etc/passwd", LOCAL)
    assert "unsupported scheme 'file'" in message


async def test_size_limit_from_content_length(server):
    message = await refused(server.url("/ok"), FetchPolicy(allow_private=True, max_bytes=1000))
    assert "10240 bytes, over the 1000 byte limit" in message


async def test_size_limit_while_streaming_without_content_length(server):
    assert await fetch_uri(server.url("/stream?chunks=2"), policy=LOCAL) == BODY * 2
    message = await refused(server.url("/stream?chunks=100"), LOCAL)
    assert f"larger than the {LOCAL.max_bytes} byte limit" in message


async def test_a_gzip_body_is_not_inflated(server):
    data = await fetch_uri(server.url("/gzip"), policy=FetchPolicy(allow_private=True, max_bytes=1024 * 1024))
    assert data == gzip.compress(bytes(8 * 1024 * 1024), mtime=0)  # the compressed bytes, under the limit


async def test_a_slow_server_times_out(server):
    message = await refused(server.url("/slow"), FetchPolicy(allow_private=True, timeout_s=0.2))
    assert "timed out after 0.2 s" in message


@pytest.mark.parametrize(("path", "status"), [("/missing", "HTTP 404 Not Found"), ("/teapot", "HTTP 418")])
async def test_non_2xx_names_the_status(server, path, status):
    assert status in await refused(server.url(path), LOCAL)


async def test_a_closed_port_is_a_fetch_failure():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connection refused
        assert "failed" in await refused(f"http://127.0.0.1:{port}/", LOCAL)


@pytest.mark.parametrize(("uri", "message"), [
    ("ftp://example.com/a.png", "unsupported scheme 'ftp'"),
    ("gopher://example.com/", "unsupported scheme 'gopher'"),
    ("data:image/png;base64,AAAA", "unsupported scheme 'data'"),
    ("javascript:alert(1)", "unsupported scheme 'javascript'"),
    ("", "is not a URL"),
    ("/etc/passwd", "is not a URL"),
    ("http://", "no host"),
    ("http:///only/a/path", "no host"),
    ("http://[::1/", "malformed URL"),
    ("http://exa mple.com/", "bad host name"),
    ("http://2130706433/", "malformed URL"),
])
async def test_bad_urls_name_the_problem(uri, message):
    assert message in await refused(uri, LOCAL)


async def test_file_uris_stay_under_the_media_root(tmp_path):
    root = tmp_path / "media"
    root.mkdir()
    (root / "a.png").write_bytes(b"png")
    (tmp_path / "secret").write_bytes(b"secret")
    policy = FetchPolicy(media_root=str(root), max_bytes=100)
    assert await fetch_uri((root / "a.png").as_uri(), policy=policy) == b"png"
    assert "outside the media root" in await refused(f"file://{root}/../secret", policy)
    assert "outside the media root" in await refused("file:///etc/passwd", policy)
    assert "no such file" in await refused(f"file://{root}/missing.png", policy)
    assert "must not name a host" in await refused(f"file://evil.example{root}/a.png", policy)
    assert "disabled" in await refused((root / "a.png").as_uri(), FetchPolicy())
    (root / "big.bin").write_bytes(bytes(101))
    assert "larger than the 100 byte limit" in await refused((root / "big.bin").as_uri(), policy)


def test_a_file_read_in_place_is_hashed_and_checked_for_changes(tmp_path):
    """The router hashes a file:// item where it lies and the decoder refuses it if it changed since."""
    root = tmp_path / "media"
    root.mkdir()
    path = root / "clip.mp4"
    path.write_bytes(BODY)
    assert [uri_scheme(u) for u in (path.as_uri(), "FILE:///x", "https://a/b.mp4", "/no/scheme")] == [
        "file", "file", "https", ""]
    file = hash_file_uri(path.as_uri(), media_root=str(root), max_bytes=len(BODY))
    assert (file.path, file.size, file.sha256) == (path, len(BODY), hashlib.sha256(BODY).hexdigest())
    assert file.uri == path.as_uri()
    check_unchanged(path, file.uri, size=file.size, mtime_ns=file.mtime_ns)
    check_unchanged(path, file.uri, size=0, mtime_ns=0)  # unchecked
    with pytest.raises(MediaError, match="larger than the 100 byte limit"):
        hash_file_uri(path.as_uri(), media_root=str(root), max_bytes=100)
    os.utime(path, ns=(file.mtime_ns + 1, file.mtime_ns + 1))  # rewritten in place, same size
    with pytest.raises(MediaError, match="changed after the router read it"):
        check_unchanged(path, file.uri, size=file.size, mtime_ns=file.mtime_ns)
    path.unlink()
    with pytest.raises(MediaError, match="changed after the router read it"):
        check_unchanged(path, file.uri, size=file.size, mtime_ns=file.mtime_ns)


async def test_file_uri_refusals_reveal_nothing_outside_the_media_root(tmp_path):
    root = tmp_path / "media"
    root.mkdir()
    (tmp_path / "secret-target").write_bytes(b"secret")
    (root / "link.png").symlink_to(tmp_path / "secret-target")
    (root / "dangling.png").symlink_to(tmp_path / "missing-target")
    policy = FetchPolicy(media_root=str(root), max_bytes=100)
    for name in ("link.png", "dangling.png"):
        message = await refused((root / name).as_uri(), policy)
        assert message == f"uri: file://{root}/{name} is outside the media root"  # the target is never named
    # Outside the root, an existing and a missing file get the same answer.
    existing = await refused((tmp_path / "secret-target").as_uri(), policy)
    missing = await refused((tmp_path / "nothing-here").as_uri(), policy)
    assert existing.replace("secret-target", "X") == missing.replace("nothing-here", "X")


@pytest.mark.parametrize(("address", "reason"), [
    ("127.0.0.1", "loopback"), ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("192.168.1.1", "private"),
    ("169.254.169.254", "link-local"), ("224.0.0.1", "multicast"), ("240.0.0.1", "reserved"),
    ("0.0.0.0", "unspecified"), ("100.64.0.1", "non-global"), ("::1", "loopback"), ("fe80::1", "link-local"),
    ("fe80::1%eth0", "link-local"), ("fc00::1", "private"), ("ff02::1", "multicast"), ("::", "unspecified"),
    ("fec0::1", "site-local"), ("::ffff:10.0.0.1", "private, as IPv4 10.0.0.1"),
    ("::ffff:127.0.0.1", "loopback, as IPv4 127.0.0.1"), ("2002:7f00:1::", "loopback, as IPv4 127.0.0.1"),
    ("64:ff9b::a9fe:a9fe", "link-local, as IPv4 169.254.169.254"),
    ("8.8.8.8", None), ("1.1.1.1", None), ("2606:4700:4700::1111", None), ("::ffff:8.8.8.8", None),
])
def test_blocked_reason(address, reason):
    assert blocked_reason(address) == reason


class FakeResolver(AbstractResolver):
    """Answers from a table, one answer per call in turn (a rebinding DNS server)."""

    def __init__(self, answers: list[list[str]]):
        self.answers = answers

    async def resolve(self, host, port=0, family=socket.AF_INET):
        addresses = self.answers.pop(0)
        return [{"hostname": host, "host": a, "port": port, "family": socket.AF_INET, "proto": 0, "flags": 0}
                for a in addresses]

    async def close(self):
        pass


async def test_the_resolver_refuses_a_name_with_any_private_address():
    resolver = CheckedResolver(FakeResolver([["93.184.215.14"], ["93.184.215.14", "10.0.0.5"], ["127.0.0.1"]]))
    assert [r["host"] for r in await resolver.resolve("media.example", 80)] == ["93.184.215.14"]
    with pytest.raises(MediaError, match=r"media.example \(10.0.0.5\): not a public address \(private\)"):
        await resolver.resolve("media.example", 80)
    # The same name rebound to loopback on the next lookup (the next connection or redirect) is refused too.
    with pytest.raises(MediaError, match="loopback"):
        await resolver.resolve("media.example", 80)


def test_policy_checks_its_fields():
    with pytest.raises(ValueError):
        FetchPolicy(max_bytes=0)
    with pytest.raises(ValueError):
        FetchPolicy(timeout_s=0)
