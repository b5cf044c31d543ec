"""Bad input through the public API gets INVALID_ARGUMENT naming the problem, and the stack keeps serving."""

from __future__ import annotations

import dataclasses
import functools
import http.server
import pathlib
import threading
import zlib
from collections.abc import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mmserve.media.samples import make_image, make_video
from mmserve.v1 import api_pb2, api_pb2_grpc
from tests.integration.crafted_media import (avi_claiming_frames, clip, corrupt, encode, gif_with_screen,
                                             jpeg_claiming, mkv_claiming_seconds, png_bomb, png_header, still,
                                             webp_canvas)
from tests.integration.helpers import collect, image, request, text, video
from tests.integration.reference import Reference

INVALID = grpc.StatusCode.INVALID_ARGUMENT


# --- cases ---------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Env:
    media_root: pathlib.Path
    http_port: int  # a real HTTP server on loopback that would serve a valid PNG, were it allowed


Build = Callable[[Env], api_pb2.GenerateRequest]


def ask(*parts: api_pb2.Part, **sampling) -> Build:
    """A one-turn request with the parts and a question, optional sampling overrides."""
    def build(env: Env) -> api_pb2.GenerateRequest:
        req = request(*parts, text("What is this?"), num_tokens=4)
        for name, value in sampling.items():
            if name == "stop":
                req.sampling.stop.extend(value)
            else:
                setattr(req.sampling, name, value)
        return req
    return build


def with_id(req: api_pb2.GenerateRequest, request_id: str) -> api_pb2.GenerateRequest:
    req.request_id = request_id
    return req


def with_slo(req: api_pb2.GenerateRequest, **slo) -> api_pb2.GenerateRequest:
    req.slo.CopyFrom(api_pb2.Slo(**slo))
    return req


def img(make: Callable[[], bytes], **options) -> Build:
    return lambda env: request(api_pb2.Part(image=api_pb2.Media(data=make(), **options)), text("What is this?"),
                               num_tokens=4)


def vid(make: Callable[[], bytes], **options) -> Build:
    return lambda env: request(video(make(), **options), text("What happens?"), num_tokens=4)


def url(make_uri: Callable[[Env], str], kind: str = "image") -> Build:
    return lambda env: request(api_pb2.Part(**{kind: api_pb2.Media(uri=make_uri(env))}), text("What?"), num_tokens=4)


def raw(*messages: api_pb2.Message) -> Build:
    return lambda env: api_pb2.GenerateRequest(messages=list(messages))


def user(*parts: api_pb2.Part, role: str = "user") -> api_pb2.Message:
    return api_pb2.Message(role=role, parts=list(parts))


def text_file(env: Env) -> str:
    path = env.media_root / "notes.png"
    path.write_text("a text file with a picture's name")
    return path.as_uri()


PNG = functools.partial(make_image, width=128, height=128)
JPEG = functools.partial(make_image, width=128, height=128, fmt="JPEG")
NAN, INF = float("nan"), float("inf")

CASES: dict[str, tuple[Build, str]] = {
    # Requests and messages.
    "empty request": (raw(), "messages: empty"),
    "unknown role": (raw(user(text("hi"), role="wizard")), "messages[0].role: unknown role 'wizard'"),
    "empty role": (raw(user(text("hi"), role="")), "messages[0].role: unknown role ''"),
    "message with no parts": (raw(user(text("hi")), user()), "messages[1].parts: empty"),
    "part with no content": (raw(user(api_pb2.Part())), "messages[0].parts[0]: no text, image or video"),
    "media in an assistant message": (raw(user(image(PNG()), role="assistant")),
                                      "messages[0].parts[0].image: media is only allowed in user messages"),
    "too many messages": (raw(*[user(text("hi"))] * 257), "messages: 257 exceed the limit of 256"),
    "too many media": (raw(user(*[image(b"x")] * 17, text("hi"))), "messages: 17 media items exceed the limit of 16"),
    "media without source": (ask(api_pb2.Part(image=api_pb2.Media())),
                             "messages[0].parts[0].image: neither data nor uri"),
    "prompt beyond the context length": (lambda env: request(text("many words " * 20000), num_tokens=8),
                                         "exceed the context length"),
    "prompt plus max_tokens beyond the context length": (ask(text("word " * 30000), max_tokens=4000, min_tokens=0),
                                                         "exceed the context length"),
    "a 2-million-character prompt": (ask(text("x" * 2_000_000)), "exceed the context length"),
    "request id with a forged log line": (lambda env: with_id(request(text("hi"), num_tokens=4),
                                                               "a\n2026-12-07 INFO forged"), "request_id: at most 128"),
    "request id of 129 characters": (lambda env: with_id(request(text("hi"), num_tokens=4), "r" * 129),
                                     "request_id: at most 128"),
    "a time-to-first-token target without bound": (lambda env: with_slo(request(text("hi"), num_tokens=4),
                                                                        ttft_ms=4_000_000_000),
                                                   "slo.ttft_ms: 4000000000 exceeds the limit of 600000 ms"),
    "a time-per-token target without bound": (lambda env: with_slo(request(text("hi"), num_tokens=4),
                                                                   tpot_ms=4_000_000_000),
                                              "slo.tpot_ms: 4000000000 exceeds the limit of 600000 ms"),
    # Sampling.
    "negative temperature": (ask(temperature=-1.0), "sampling.temperature: -1.0 is not in [0, 100]"),
    "NaN temperature": (ask(temperature=NAN), "sampling.temperature: nan"),
    "infinite temperature": (ask(temperature=INF), "sampling.temperature: inf"),
    "top_p zero": (ask(top_p=0.0), "sampling.top_p: 0.0 is not in (0, 1]"),
    "top_p above one": (ask(top_p=1.5), "sampling.top_p: 1.5 is not in (0, 1]"),
    "NaN top_p": (ask(top_p=NAN), "sampling.top_p: nan"),
    "zero max_tokens": (ask(max_tokens=0, min_tokens=0), "sampling.max_tokens: must be at least 1"),
    "huge max_tokens": (ask(max_tokens=10**9, min_tokens=0), "sampling.max_tokens: 1000000000 is not in [1, 8192]"),
    "min_tokens above max_tokens": (ask(max_tokens=4, min_tokens=5), "sampling.min_tokens: larger than max_tokens"),
    "empty stop string": (ask(stop=["end", ""]), "sampling.stop: empty stop string"),
    "too many stop strings": (ask(stop=[f"stop{i}" for i in range(1000)]), "sampling.stop: 1000 stop strings"),
    "too long stop string": (ask(stop=["x" * 100_000]), "sampling.stop: a stop string of 100000 characters"),
    # Images: empty, corrupt, truncated, mislabelled, absurd sizes, bombs.
    "empty image": (img(lambda: b""), "messages[0].parts[0].image.data: empty"),
    "text file as image": (img(lambda: b"this is plain text, not a picture"), "not a JPEG, PNG, WebP or GIF"),
    "video as image": (img(lambda: clip(True)), "not a JPEG, PNG, WebP or GIF"),
    "png with a wrong magic": (img(lambda: b"\x00" + PNG()[1:]), "not a JPEG, PNG, WebP or GIF"),
    "bmp image": (img(lambda: still("BMP")), "not a JPEG, PNG, WebP or GIF"),
    "tiff image": (img(lambda: still("TIFF")), "not a JPEG, PNG, WebP or GIF"),
    "truncated png": (img(lambda: PNG()[:len(PNG()) // 2]), "truncated or corrupt PNG data"),
    "truncated jpeg": (img(lambda: JPEG()[:len(JPEG()) // 2]), "truncated or corrupt JPEG data"),
    "jpeg header only": (img(lambda: JPEG()[:200]), "Truncated"),
    "corrupt png data": (img(lambda: corrupt(PNG(), 0.5)), "truncated or corrupt PNG data"),
    "png claiming 100000x100000": (img(lambda: png_header(100000, 100000, zlib.compress(b"\x00" * 10))),
                                   "image: dimensions too large"),
    "png claiming 0x0": (img(lambda: png_header(0, 0, zlib.compress(b""))), "image: corrupt or unsupported PNG header"),
    "png bomb 9000x9000": (img(lambda: png_bomb(9000)), "image: 9000x9000 is 81000000 pixels, over the limit"),
    "png bomb 20000x20000": (img(lambda: png_bomb(20000)), "image: dimensions too large"),
    "jpeg claiming 10000x10000": (img(lambda: jpeg_claiming(10000, 10000)), "image: 10000x10000 is 100000000 pixels"),
    "jpeg claiming 60000x60000": (img(lambda: jpeg_claiming(60000, 60000)), "image: dimensions too large"),
    "gif with a huge logical screen": (img(lambda: gif_with_screen(65535, 65535)), "image: dimensions too large"),
    "gif with a 10000x10000 screen": (img(lambda: gif_with_screen(10000, 10000)), "image: 10000x10000 is"),
    "webp claiming 16384x16384": (img(lambda: webp_canvas(16384, 16384)), "image: dimensions too large"),
    "1x1 png asking for 40 million pixels": (img(lambda: make_image(width=1, height=1), min_pixels=40_000_000,
                                                 max_pixels=40_000_000),
                                             "image.min_pixels: 40000000 is outside the server's bounds"),
    "two images of 16384 vision tokens each": (ask(image(png_header(3584, 3584, zlib.compress(b"\x00" * 10))),
                                                   image(png_header(3584, 3584, zlib.compress(b"\x01" * 10)))),
                                               "messages: 32768 vision tokens exceed the limit of 16384"),
    "image of extreme aspect ratio": (img(lambda: png_header(1000, 2, zlib.compress(bytes(3001 * 2)))),
                                      "aspect ratio 500.0 of 1000x2 exceeds the limit of 200"),
    # Videos: empty, corrupt, truncated, mislabelled, unsupported, too long.
    "empty video": (vid(lambda: b""), "messages[0].parts[0].video.data: empty"),
    "text file as video": (vid(lambda: b"\x00\x01garbage" * 100), "video: not a recognised video container"),
    "png as video": (vid(PNG), "video: got a still image (png), not a video"),
    "jpeg as video": (vid(JPEG), "video: got a still image"),
    "truncated mp4 without its index": (vid(lambda: clip(False)[:len(clip(False)) // 2]),
                                        "video: not a recognised video container, or the data is truncated"),
    "truncated faststart mp4": (vid(lambda: clip(True)[:len(clip(True)) * 2 // 3]), "video: truncated"),
    "mp4 with a corrupt index": (vid(lambda: corrupt(clip(True), 0.02, 400)), "container has no video stream"),
    "ffv1 in matroska": (vid(lambda: encode("ffv1", "matroska")), "video: unsupported codec 'ffv1'"),
    "huffyuv in avi": (vid(lambda: encode("huffyuv", "avi", pix_fmt="yuv422p")), "video: unsupported codec 'huffyuv'"),
    "msmpeg4v2 in avi": (vid(lambda: encode("msmpeg4v2", "avi")), "video: unsupported codec 'msmpeg4v2'"),
    "flv container": (vid(lambda: encode("flv", "flv")), "video: unsupported container 'flv'"),
    "asf container": (vid(lambda: encode("wmv2", "asf")), "video: unsupported container 'asf'"),
    "animated gif as video": (vid(lambda: encode("gif", "gif", pix_fmt="rgb8")), "video: unsupported container 'gif'"),
    "raw h264 stream": (vid(lambda: encode("libx264", "h264")), "video: unsupported container 'h264'"),
    "audio-only mp4": (vid(lambda: encode(None, "mp4", audio="aac")), "container has no video stream"),
    "wav as video": (vid(lambda: encode(None, "wav", audio="pcm_s16le")), "video: unsupported container 'wav'"),
    "single-frame video": (vid(lambda: encode("mpeg4", "mp4", frames=1)),
                           "video: cannot sample from a clip of only 1 frame(s)"),
    "video of extreme aspect ratio": (vid(lambda: encode("mpeg4", "avi", width=2000, height=8)),
                                      "aspect ratio 250.0 of 2000x8 exceeds the limit of 200"),
    # max_frames 8: few enough vision tokens for the router's plan, so the decoder's length limits are what refuse.
    "video header claiming 25000000 s": (vid(lambda: avi_claiming_frames(100_000_000, fps=4), max_frames=8),
                                         "video: 25000000.0 s long, over the limit of 7200 s"),
    "the same header at the default frame count": (vid(lambda: avi_claiming_frames(100_000_000, fps=4)),
                                                   "messages: 55296 vision tokens exceed the limit of 16384"),
    "video header claiming 1000000 frames": (vid(lambda: avi_claiming_frames(1_000_000, fps=500), max_frames=8),
                                             "video: more than 432000 frames, over the limit"),
    "matroska claiming 1000000 s": (vid(lambda: mkv_claiming_seconds(1e6)), "video: 1000000.0 s long, over the limit"),
    "video fps zero": (vid(lambda: clip(True), fps=0.0), "messages[0].parts[0].video.fps: 0.0 is not in (0, 60]"),
    "video fps NaN": (vid(lambda: clip(True), fps=NAN), "video.fps: nan is not in (0, 60]"),
    "video max_frames one": (vid(lambda: clip(True), max_frames=1), "video.max_frames: 1 is not in [2, 768]"),
    "video max_pixels below a patch": (vid(lambda: clip(True), max_pixels=100), "video.max_pixels: below one 28x28"),
    "video min_pixels above max_pixels": (vid(lambda: clip(True), min_pixels=10**6, max_pixels=10**5),
                                          "min_pixels is larger than max_pixels"),
    # URLs: schemes, malformed, outside the media root, private targets.
    "empty uri": (url(lambda env: ""), "messages[0].parts[0].image.uri: empty"),
    "ftp uri": (url(lambda env: "ftp://example.com/a.png"), "image.uri: unsupported scheme 'ftp'"),
    "gopher uri": (url(lambda env: "gopher://example.com/a.png"), "image.uri: unsupported scheme 'gopher'"),
    "not a url": (url(lambda env: "just some words"), "image.uri: 'just some words' is not a URL"),
    "http url without a host": (url(lambda env: "http:///a.png"), "image.uri: malformed URL"),
    "http url with a broken IPv6 host": (url(lambda env: "http://[::1/a.png"), "image.uri: malformed URL"),
    "file outside the media root": (url(lambda env: "file:///etc/passwd"), "outside the media root"),
    "file path traversal": (url(lambda env: f"file://{env.media_root}/../../../etc/passwd"), "outside the media root"),
    "missing file under the media root": (url(lambda env: (env.media_root / "nope.png").as_uri()), "no such file"),
    "file uri naming a host": (url(lambda env: f"file://evil.example{env.media_root}/a.png"), "must not name a host"),
    "text file under the media root": (url(text_file), "not a JPEG, PNG, WebP or GIF"),
    "loopback url": (url(lambda env: f"http://127.0.0.1:{env.http_port}/picture.png"),
                     "refusing to fetch from 127.0.0.1: not a public address (loopback)"),
    "localhost url": (url(lambda env: f"http://localhost:{env.http_port}/picture.png"),
                      "refusing to fetch from localhost"),
    "private 10.x url": (url(lambda env: "http://10.0.0.1/picture.png"), "10.0.0.1: not a public address (private)"),
    "cloud metadata url": (url(lambda env: "http://169.254.169.254/latest/meta-data/"),
                           "169.254.169.254: not a public address (link-local)"),
    "IPv6 loopback url": (url(lambda env: f"http://[::1]:{env.http_port}/picture.png"),
                          "::1: not a public address (loopback)"),
    "IPv4-mapped IPv6 url": (url(lambda env: "http://[::ffff:127.0.0.1]/v.mp4", "video"),
                             "not a public address (loopback, as IPv4 127.0.0.1)"),
}


# --- fixtures and tests --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def http_port():
    """A loopback HTTP server with a valid PNG: any request that reaches it has slipped past the SSRF checks."""
    picture = make_image(width=56, height=56)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(picture)))
            self.end_headers()
            self.wfile.write(picture)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    thread.join()


@pytest.fixture(scope="module")
def env(media_root, http_port) -> Env:
    return Env(media_root, http_port)


def greedy_request() -> api_pb2.GenerateRequest:
    return request(image(make_image(width=84, height=56, seed=21)), text("Describe the picture."), num_tokens=16)


@pytest.fixture(scope="module")
def before(router):
    """The greedy answer to one request before any bad input reached the stack."""
    return collect(router, greedy_request())


def _status(router, req) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        collect(router, req, timeout=60)
    return info.value


def test_the_suite_is_big_enough():
    assert len(CASES) >= 50


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_invalid_argument(router, env, before, case):
    build, message = CASES[case]
    err = _status(router, build(env))
    assert err.code() == INVALID, err.details()
    assert message in err.details()


def test_a_message_over_the_size_limit_is_refused_by_grpc(stack, before):
    # Our own channel: the shared stub would refuse to send it (its cap equals the router's).
    with grpc.insecure_channel(stack) as channel:
        stub = api_pb2_grpc.RouterStub(channel)
        err = _status(stub, request(video(bytes(257 * 1024 * 1024)), text("hi")))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "Received message larger than max" in err.details()  # the router's answer, not our channel's


def test_file_uri_under_the_media_root_works(router, media_root, before):
    path = media_root / "picture.png"
    path.write_bytes(make_image(width=84, height=56, seed=5))
    by_uri = collect(router, request(api_pb2.Part(image=api_pb2.Media(uri=path.as_uri())), text("What?"),
                                     num_tokens=8))
    by_bytes = collect(router, request(image(path.read_bytes()), text("What?"), num_tokens=8))
    assert by_uri.token_ids == by_bytes.token_ids


def test_the_router_counts_the_prompt_as_the_llm_does(router, tiny_model, before):
    """The refusal's token count, made before any media work, equals the prompt the llm builds for the same request
    (an estimate would be off): text, an image and a video, near the context length."""
    media = [image(make_image(width=84, height=56, seed=3)), video(make_video(seconds=1.0, fps=8, width=64, height=48))]
    words = "the quick brown fox " * 2900  # ~26k tokens, so that max_tokens 8192 cannot fit in 32768

    def ask_with(max_tokens: int) -> api_pb2.GenerateRequest:
        req = request(*media, text(words), num_tokens=max_tokens)
        req.sampling.min_tokens = 0
        return req

    served = collect(router, ask_with(1), timeout=120)
    err = _status(router, ask_with(8192))
    assert err.code() == INVALID
    assert err.details().startswith(f"prompt: {served.final.prompt_tokens} tokens (")
    assert err.details().endswith("+ max_tokens 8192 exceed the context length 32768")


def test_the_stack_is_healthy_and_exact_after_the_suite(stack, router, tiny_model, before):
    """Runs last in this module: every case above has hit the stack by now."""
    with grpc.insecure_channel(stack) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    after = collect(router, greedy_request())
    assert after.token_ids == before.token_ids
    assert after.token_ids == Reference(tiny_model).generate(greedy_request(), 16)
