"""Bad JSON bodies are 400s in OpenAI's shape, never 500s, and oversized ones 413s: through the real HTTP endpoint
(before any router) and the parser."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from stack.ports import free_port
from services.router import json_body
from services.router.config import RouterConfig
from services.router.openai_api import OpenAiServer
from services.router.openai_protocol import ApiError, parse_chat_body

LIMIT = 1 << 20  # http_max_body_bytes of the endpoint under test
GOOD = b'{"messages": [{"role": "user", "content": "hi"}]}'
DEEP = 100_000


def chat(content: str, **extra: str) -> bytes:
    """A chat body with raw JSON text as the user message's content (and as other fields)."""
    fields = "".join(f', "{name}": {value}' for name, value in extra.items())
    return f'{{"messages": [{{"role": "user", "content": {content}}}]{fields}}}'.encode()


BAD_JSON = {
    "lone high surrogate": (chat(r'"\ud800"'), "messages[0].content"),
    "lone low surrogate in a part": (chat(r'[{"type": "text", "text": "a\udfffb"}]'), "messages[0].content[0].text"),
    "surrogate in a stop string": (chat('"hi"', stop=r'["x", "\ud834"]'), "stop[1]"),
    "surrogate in a key": (chat('"hi"', metadata=r'{"\udc00": 1}'), "metadata"),
    "surrogate in a top-level key": (b'{"\\ud800": 1}', "body"),
    "deeply nested arrays": (b"[" * DEEP + b"]" * DEEP, "body"),
    "deeply nested objects": (b'{"a": ' * DEEP + b"1" + b"}" * DEEP, "body"),
    "deep within the recursion limit": (chat('"hi"', metadata="[" * 500 + "]" * 500), "metadata"),
    "top-level array": (b"[" + GOOD + b"]", "body"),
    "top-level string": (b'"hi"', "body"),
    "top-level null": (b"null", "body"),
    "top-level number": (b"1e999", "body"),
    "empty body": (b"", "body"),
    "not UTF-8": (b'{"messages": "\xff\xfe"}', "body"),
    "NaN": (chat('"hi"', temperature="NaN"), "body"),
    "Infinity": (chat('"hi"', top_p="-Infinity"), "body"),
    "float overflow": (chat('"hi"', temperature="1e999"), "body"),
    "5000-digit integer": (chat('"hi"', max_tokens="9" * 5000), "body"),
    "huge integer": (chat('"hi"', seed="1" + "0" * 40), "seed"),
    "messages an object": (b'{"messages": {"role": "user"}}', "messages"),
    "role a list": (b'{"messages": [{"role": ["user"], "content": "hi"}]}', "messages[0].role"),
    "role an object": (b'{"messages": [{"role": {}, "content": "hi"}]}', "messages[0].role"),
    "part type a list": (chat('[{"type": ["text"], "text": "hi"}]'), "messages[0].content[0].type"),
    "part type an object": (chat('[{"type": {"a": 1}}]'), "messages[0].content[0].type"),
    "content a number": (chat("7"), "messages[0].content"),
}


@pytest.mark.parametrize("case", list(BAD_JSON))
def test_bad_json_is_a_400_naming_the_field(case):
    raw, param = BAD_JSON[case]
    with pytest.raises(ApiError) as info:
        parse_chat_body(raw, model_name="tiny", request_id="r1")
    assert info.value.status == 400 and info.value.param.startswith(param)
    json.dumps(info.value.body()).encode()  # the answer itself encodes


def test_valid_unicode_and_nesting_up_to_the_limit_pass():
    parsed = parse_chat_body(chat(r'"\ud83d\ude00 \u00fc"'), model_name="tiny", request_id="r1")  # a surrogate pair
    assert parsed.grpc_request.messages[0].parts[0].text == "\U0001F600 ü"
    nested = "[" * (json_body.MAX_DEPTH - 1) + "]" * (json_body.MAX_DEPTH - 1)  # the body object is level one
    assert parse_chat_body(chat('"hi"', metadata=nested), model_name="tiny", request_id="r1")
    with pytest.raises(ApiError, match="nested deeper"):
        parse_chat_body(chat('"hi"', metadata="[" + nested + "]"), model_name="tiny", request_id="r1")


@pytest.fixture(scope="module")
async def endpoint():
    """The HTTP endpoint with a 1 MiB body limit and no router behind it: whatever it parses is answered 503."""
    config = RouterConfig(model="tiny", decoder_addrs="x:1", encoder_addrs="x:2", llm_addrs="x:3",
                          http_port=free_port(), http_max_body_bytes=LIMIT)
    http = OpenAiServer(config)
    await http.start()
    try:
        yield f"http://127.0.0.1:{config.http_port}/v1/chat/completions"
    finally:
        await http.close()


async def post(url: str, data) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session, session.post(url, data=data) as reply:
        return reply.status, await reply.json()


def assert_openai_error(body: dict, param: str) -> None:
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["param"].startswith(param)


@pytest.mark.parametrize("case", ["lone high surrogate", "surrogate in a key", "deeply nested arrays",
                                  "deeply nested objects", "top-level array", "role a list", "part type an object"])
async def test_the_endpoint_answers_bad_json_with_400_in_openai_shape(endpoint, case):
    raw, param = BAD_JSON[case]
    status, body = await post(endpoint, raw)
    assert status == 400
    assert_openai_error(body, param)


async def test_a_body_at_the_limit_is_read_and_one_byte_more_is_413(endpoint):
    at_limit = GOOD + b" " * (LIMIT - len(GOOD))
    assert (await post(endpoint, at_limit))[0] == 503  # parsed; refused only for the missing router
    status, body = await post(endpoint, at_limit + b" ")
    assert status == 413
    assert_openai_error(body, "body")


async def test_a_chunked_body_over_the_limit_is_413(endpoint):
    async def chunks():
        yield GOOD
        for _ in range(LIMIT // 4096 + 1):
            yield b" " * 4096

    status, body = await post(endpoint, chunks())
    assert status == 413
    assert_openai_error(body, "body")


async def test_a_content_length_over_the_limit_is_refused_before_the_body_arrives(endpoint):
    host, port = endpoint.removeprefix("http://").split("/")[0].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        # Only the headers are sent: an answer proves the body was never waited for.
        writer.write(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {100 * LIMIT}\r\n\r\n".encode())
        await writer.drain()
        # The bound only turns a server that waits for the body into a failure instead of a hang.
        status_line = await asyncio.wait_for(reader.readline(), timeout=30)
        assert status_line.split()[1] == b"413"
    finally:
        writer.close()
