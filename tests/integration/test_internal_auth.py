"""Authentication reaches every port, on real processes: the stack `mmserve up` plans (generated internal token and
Redis password, API tokens on the router) serves end to end with the cache, while the stage ports, their tensor
stores and the private Redis refuse callers without the stack's credentials; a stage bound to every address with
no credential refuses to start."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mmserve import internal_token
from stack.launcher import StackSpec, plan
from stack.ports import free_port
from mmserve.media.samples import make_image
from mmserve.transport import remote
from mmserve.v1 import decoder_pb2, decoder_pb2_grpc, encoder_pb2, encoder_pb2_grpc, llm_pb2, llm_pb2_grpc, tensor_pb2
from tests.conftest import RELAXED_SLOS
from tests.integration.helpers import collect, image, request, router_stub, running, text

API_TOKEN = "sk-client"


@pytest.fixture(scope="module")
def planned(tiny_model, tmp_path_factory):
    """The children of `mmserve up` with API tokens and generated secrets, running; their secrets directory."""
    root = tmp_path_factory.mktemp("internal-auth")
    tokens = root / "tokens"
    tokens.write_text(API_TOKEN + "\n")
    spec = StackSpec(model=str(tiny_model), port=free_port(), log_level="WARNING", api_tokens_file=str(tokens),
                     secrets_dir=str(root / "secrets"), router_args=RELAXED_SLOS)
    planned = plan(spec)
    children, router = planned.children(), planned.router_address
    for child in children:  # a loaded test machine must not turn a cache write into a timeout (a miss)
        if "--redis-url" in child.argv:
            child.argv += ["--cache-timeout-ms", "5000"]
    with running(children):
        yield {c.name: c for c in children}, router, root / "secrets"


def _code(call) -> grpc.StatusCode:
    """The status a call fails with (a stream is read to its end)."""
    with pytest.raises(grpc.RpcError) as info:
        reply = call()
        if isinstance(reply, grpc.Future):  # a stream's call object (a unary reply is a message)
            list(reply)
    return info.value.code()


def test_stage_ports_refuse_calls_without_the_internal_token_and_health_stays_open(planned):
    children, _, secrets = planned
    token = (secrets / "internal-token").read_text().strip()
    for name, stub_class, method, message in (
            ("decoder", decoder_pb2_grpc.DecoderStub, "Decode", decoder_pb2.DecodeRequest()),
            ("encoder", encoder_pb2_grpc.EncoderStub, "Encode", encoder_pb2.EncodeRequest()),
            ("llm", llm_pb2_grpc.LlmStub, "Generate", llm_pb2.LlmRequest())):
        with grpc.insecure_channel(children[name].address) as channel:
            rpc = getattr(stub_class(channel), method)
            assert _code(lambda: rpc(message, timeout=30)) == grpc.StatusCode.UNAUTHENTICATED, name
            wrong = ((internal_token.HEADER, "not-the-token"),)
            assert _code(lambda: rpc(message, timeout=30, metadata=wrong)) == grpc.StatusCode.UNAUTHENTICATED, name
            pull = channel.unary_stream(f"/{remote.SERVICE}/Pull", tensor_pb2.PullRequest.SerializeToString,
                                        tensor_pb2.TensorChunk.FromString)
            handle = tensor_pb2.PullRequest(handle_id="0" * 32)
            assert _code(lambda: pull(handle, timeout=30)) == grpc.StatusCode.UNAUTHENTICATED, name
            own = ((internal_token.HEADER, token),)  # the stack's token passes: the lease is merely unknown
            assert _code(lambda: pull(handle, timeout=30, metadata=own)) == grpc.StatusCode.NOT_FOUND, name
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
            assert health.status == health_pb2.HealthCheckResponse.SERVING, name


def test_the_stack_serves_end_to_end_and_its_cache_works_behind_the_password(planned):
    children, router, secrets = planned
    req = request(text("Describe"), image(make_image(seed=7)), text("briefly."), num_tokens=4)
    with router_stub(router) as stub:
        with pytest.raises(grpc.RpcError) as info:
            collect(stub, req)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED  # the public API keeps its API tokens
        client = (("authorization", f"Bearer {API_TOKEN}"),)
        first = [*stub.Generate(req, timeout=120, metadata=client)]
        second = [*stub.Generate(req, timeout=120, metadata=client)]
    assert not first[-1].final.media_cached and second[-1].final.media_cached  # the cache, with the password
    assert [r.delta.token_ids for r in first[:-1]] == [r.delta.token_ids for r in second[:-1]]
    port = int(children["redis"].argv[children["redis"].argv.index("--port") + 1])
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(port=port).dbsize()
    password = (secrets / "redis-password").read_text().strip()
    assert redis.Redis(port=port, password=password).dbsize() > 0


def test_a_stage_on_every_address_without_a_credential_refuses_to_start():
    started = subprocess.run([sys.executable, "-m", "services.decoder", "--host", "0.0.0.0", "--port",
                              str(free_port())], capture_output=True, text=True, timeout=120)
    assert started.returncode != 0
    assert "host: 0.0.0.0 is reachable from other hosts; a stage there needs internal_token_file" in started.stderr
