"""Bad input gets INVALID_ARGUMENT naming the problem, and the stack keeps serving."""

from __future__ import annotations

import grpc
import pytest

from mmserve.media.samples import make_image
from mmserve.v1 import api_pb2
from tests.integration.helpers import collect, image, request, text, video


def _status(router, req) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        collect(router, req)
    return info.value


CASES = {
    "empty messages": (api_pb2.GenerateRequest(), "messages: empty"),
    "unknown role": (request(text("hi"), role="wizard"), "messages[0].role: unknown role 'wizard'"),
    "media without source": (request(api_pb2.Part(image=api_pb2.Media()), text("hi")),
                             "messages[0].parts[0].image: neither data nor uri"),
    "image that is not an image": (request(image(b"this is plain text, not a picture"), text("hi")),
                                   "not a JPEG, PNG, WebP or GIF"),
    "video that is not a video": (request(video(b"\x00\x01garbage" * 100), text("hi")), "video"),
    "png passed as video": (request(video(make_image()), text("hi")), "video"),
    "uri outside the media root": (request(api_pb2.Part(image=api_pb2.Media(uri="file:///etc/passwd")),
                                           text("hi")), "outside the media root"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_invalid_argument(router, case):
    req, message = CASES[case]
    err = _status(router, req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.details()


def test_prompt_beyond_the_context_length_is_refused_before_any_work(router):
    err = _status(router, request(text("many words " * 20000), num_tokens=8))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "context length" in err.details()


def test_stack_keeps_serving_after_bad_input(router):
    for req, _ in CASES.values():
        with pytest.raises(grpc.RpcError):
            collect(router, req)
    result = collect(router, request(image(make_image(width=56, height=56)), text("Still there?"), num_tokens=8))
    assert result.final.completion_tokens == 8


def test_file_uri_under_the_media_root_works(router, media_root):
    path = media_root / "picture.png"
    path.write_bytes(make_image(width=84, height=56, seed=5))
    by_uri = collect(router, request(api_pb2.Part(image=api_pb2.Media(uri=path.as_uri())), text("What?"),
                                     num_tokens=8))
    by_bytes = collect(router, request(image(path.read_bytes()), text("What?"), num_tokens=8))
    assert by_uri.token_ids == by_bytes.token_ids
