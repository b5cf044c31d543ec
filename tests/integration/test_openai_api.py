"""The OpenAI-compatible HTTP API through the official `openai` client: on the real stack, and against a
scripted Router for what the stack cannot be made to do on demand (refusals, mid-stream failures, hangs)."""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.error
import urllib.request

import grpc
import openai
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from stack.ports import free_port
from mmserve.media.samples import make_image, make_video
from mmserve.v1 import api_pb2, api_pb2_grpc
from services.router.config import RouterConfig
from services.router.openai_api import ROUTER_SERVICE, OpenAiServer
from tests.integration.helpers import collect, image, request, text, video
from tests.integration.reference import with_logprobs


def data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


@pytest.fixture(scope="module")
def client(openai_base_url) -> openai.OpenAI:
    # No retries: a refusal must surface, not be retried away.
    return openai.OpenAI(base_url=openai_base_url, api_key="x", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(tiny_model) -> str:
    return tiny_model.name  # the default served name: the checkpoint directory's name


def greedy(num_tokens: int) -> dict:
    """The sampling of helpers.request (greedy, exactly num_tokens tokens) as OpenAI arguments."""
    return dict(max_tokens=num_tokens, temperature=0, extra_body={"min_tokens": num_tokens})


def test_models_lists_the_served_model(client, model):
    assert [m.id for m in client.models.list().data] == [model]
    assert client.models.retrieve(model).owned_by == "mmserve"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_health_is_200_while_the_router_serves(openai_base_url):
    with urllib.request.urlopen(openai_base_url.removesuffix("/v1") + "/health", timeout=30) as reply:
        assert reply.status == 200
        assert json.load(reply) == {"status": "serving"}


def test_non_streaming_greedy_text_equals_grpc(client, model, router):
    prompt = "Tell me about the sea."
    expected = collect(router, request(text(prompt), num_tokens=16))
    assert expected.text
    answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], **greedy(16))
    assert answer.choices[0].message.content == expected.text
    assert answer.choices[0].finish_reason == "length"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (expected.final.prompt_tokens, 16)
    assert answer.id.startswith("chatcmpl-") and answer.model == model and answer.object == "chat.completion"


def test_streaming_greedy_text_equals_grpc(client, model, router):
    prompt = "Count to ten."
    expected = collect(router, request(text(prompt), num_tokens=16))
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                            stream=True, stream_options={"include_usage": True}, **greedy(16))
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choice = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in with_choice) == expected.text
    assert [c.choices[0].finish_reason for c in with_choice if c.choices[0].finish_reason] == ["length"]
    assert with_choice[-1].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert {c.model for c in chunks} == {model} and {c.object for c in chunks} == {"chat.completion.chunk"}


def test_stream_is_server_sent_events_ending_in_done(openai_base_url, model):
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True}
    post = urllib.request.Request(openai_base_url + "/chat/completions", data=json.dumps(body).encode(),
                                  headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(post, timeout=120) as reply:
        assert reply.headers["Content-Type"].startswith("text/event-stream")
        raw = reply.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-2])


def test_image_data_url_equals_grpc(client, model, router):
    png = make_image(width=56, height=56, seed=3)
    expected = collect(router, request(image(png), text("What is in the picture?"), num_tokens=8))
    answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url("image/png", png)}},
        {"type": "text", "text": "What is in the picture?"}]}], **greedy(8))
    assert answer.choices[0].message.content == expected.text
    assert answer.usage.prompt_tokens == expected.final.prompt_tokens > 20  # the image tokens are in the prompt


def test_video_data_url_with_fps_equals_grpc(client, model, router):
    clip = make_video(seconds=1.0, width=112, height=84, seed=4)
    expected = collect(router, request(video(clip, fps=1.0), text("What happens?"), num_tokens=8))
    kwargs = greedy(8)
    kwargs["extra_body"]["fps"] = 1.0
    answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": data_url("video/mp4", clip)}},
        {"type": "text", "text": "What happens?"}]}], **kwargs)
    assert answer.choices[0].message.content == expected.text
    assert answer.usage.prompt_tokens == expected.final.prompt_tokens
    assert answer.model_extra["mmserve"]["num_media"] == 1


def openai_tuples(content) -> list[tuple]:
    """OpenAI's logprobs content as (token, logprob, bytes, top) tuples."""
    return [(c.token, c.logprob, bytes(c.bytes), [(t.token, t.logprob, bytes(t.bytes)) for t in c.top_logprobs])
            for c in content]


def grpc_tuples(entries) -> list[tuple]:
    """The router's Delta.logprobs entries as (token, logprob, bytes, top) tuples."""
    return [(e.chosen.text, e.chosen.logprob, e.chosen.token_bytes, [(t.text, t.logprob, t.token_bytes) for t in e.top])
            for e in entries]


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_equal_grpc(client, model, router, stream):
    prompt = "Say it in French: été, über, 海."
    expected = collect(router, with_logprobs(request(text(prompt), num_tokens=12), num_top=3))
    assert len(expected.logprobs) == 12 and all(len(e.top) == 3 for e in expected.logprobs)
    answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                            logprobs=True, top_logprobs=3, stream=stream, **greedy(12))
    if stream:
        chunks = [c.choices[0] for c in answer if c.choices]
        content = [lp for c in chunks if c.logprobs for lp in c.logprobs.content]
        assert "".join(c.delta.content or "" for c in chunks) == expected.text
    else:
        content = answer.choices[0].logprobs.content
        assert answer.choices[0].message.content == expected.text
    assert openai_tuples(content) == grpc_tuples(expected.logprobs)


def test_top_logprobs_over_the_cap_is_refused(client, model, router):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], logprobs=True,
                                       top_logprobs=21, max_tokens=2)
    assert info.value.body["param"] == "top_logprobs"
    with pytest.raises(grpc.RpcError) as refused:
        collect(router, with_logprobs(request(text("hi"), num_tokens=2), num_top=21))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details().startswith("sampling.top_logprobs: 21")


BAD = {
    "bad base64": (dict(messages=[{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}]}]),
        "messages[0].content[1].image_url.url"),
    "unknown part type": (dict(messages=[{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]), "messages[0].content[0].type"),
    "n=2": (dict(messages=[{"role": "user", "content": "hi"}], n=2), "n"),
    # Valid base64 of something that is not an image: refused by the router (INVALID_ARGUMENT), not here.
    "not an image": (dict(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url("image/png", b"plain text, no picture")}},
        {"type": "text", "text": "hi"}]}]), "not a JPEG, PNG, WebP or GIF"),
}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_content_is_a_bad_request_error(client, model, case, stream):
    kwargs, names = BAD[case]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, max_tokens=4, stream=stream, **kwargs)
    assert info.value.status_code == 400
    assert names in info.value.message and info.value.type == "invalid_request_error"


@pytest.mark.parametrize("raw, param", [
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages[0].content"),  # a lone surrogate
    (b"[" * 100_000 + b"]" * 100_000, "body"),
], ids=["lone surrogate", "100000-deep nesting"])
def test_bad_json_is_a_400_in_openai_shape(openai_base_url, raw, param):
    post = urllib.request.Request(openai_base_url + "/chat/completions", data=raw,
                                  headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(post, timeout=120)
    assert info.value.code == 400
    error = json.load(info.value)["error"]
    assert (error["param"], error["type"]) == (param, "invalid_request_error")


def test_client_closing_a_stream_early_leaves_the_service_answering(client, model):
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Go on forever."}],
                                            stream=True, **greedy(4000))
    first = next(iter(stream))
    assert first.choices[0].delta.role == "assistant"
    stream.close()
    answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Still there?"}],
                                            **greedy(8))
    assert answer.usage.completion_tokens == 8


# The HTTP layer against a scripted Router: the real interface on a real gRPC server, behaviour picked by prompt.

class ScriptedRouter(api_pb2_grpc.RouterServicer):
    def __init__(self):
        self.metadata: list[dict] = []
        self.cancelled = asyncio.Event()

    async def Generate(self, request, context):
        self.metadata.append(dict(context.invocation_metadata()))
        prompt = request.messages[-1].parts[-1].text
        if prompt == "busy":
            context.set_trailing_metadata((("retry-after-ms", "1500"),))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "router: overloaded")
        yield api_pb2.GenerateResponse(delta=api_pb2.Delta(text="partial"))
        if prompt == "break":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "llm: replica unavailable")
        try:
            await asyncio.Event().wait()  # "hang": until the caller cancels
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


@pytest.fixture
async def scripted():
    grpc_server = grpc.aio.server()
    servicer, health_servicer = ScriptedRouter(), health.aio.HealthServicer()
    api_pb2_grpc.add_RouterServicer_to_server(servicer, grpc_server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    await health_servicer.set(ROUTER_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    config = RouterConfig(model="scripted", decoder_addrs="x:1", encoder_addrs="x:2", llm_addrs="x:3",
                          http_port=free_port(), served_model_name="scripted")
    http = OpenAiServer(config)
    await http.start()
    http.connect(port)
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{config.http_port}/v1", api_key="sk-test",
                                max_retries=0, timeout=30)
    try:
        yield client, servicer, health_servicer
    finally:
        await client.close()
        await http.close()
        await grpc_server.stop(0)


def ask(prompt: str) -> dict:
    return dict(model="scripted", messages=[{"role": "user", "content": prompt}])


async def test_overload_is_429_with_retry_after_and_the_key_is_forwarded(scripted):
    client, servicer, _ = scripted
    with pytest.raises(openai.RateLimitError) as info:
        await client.chat.completions.create(**ask("busy"))
    assert info.value.response.headers["retry-after"] == "2"
    assert info.value.code == "resource_exhausted" and "overloaded" in info.value.message
    assert servicer.metadata[-1]["authorization"] == "Bearer sk-test"


async def test_error_after_the_stream_started_is_the_last_event(scripted):
    client, _, _ = scripted
    received = []
    with pytest.raises(openai.APIError, match="replica unavailable"):
        async for chunk in await client.chat.completions.create(**ask("break"), stream=True):
            received.append(chunk.choices[0].delta.content)
    assert received == ["", "partial"]


async def test_client_going_away_cancels_the_grpc_call(scripted):
    client, servicer, _ = scripted
    stream = await client.chat.completions.create(**ask("hang"), stream=True)
    assert (await anext(aiter(stream))).choices[0].delta.role == "assistant"
    assert not servicer.cancelled.is_set()
    await stream.close()
    await asyncio.wait_for(servicer.cancelled.wait(), timeout=30)


async def test_health_follows_the_router_health(scripted):
    client, _, health_servicer = scripted
    url = str(client.base_url).removesuffix("/v1/") + "/health"

    def status() -> int:
        try:
            with urllib.request.urlopen(url, timeout=10) as reply:
                return reply.status
        except urllib.error.HTTPError as err:
            return err.code

    assert await asyncio.to_thread(status) == 200
    await health_servicer.set(ROUTER_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    assert await asyncio.to_thread(status) == 503
