"""Streamed prefill end to end (issue 23), and the same cases store-and-forward (--no-stream-prefill).

Real processes: one decoder, two encoders (chunks finish out of order across them), one llm, the router, Redis.
The streamed cases need the llm's GenerateStreamed and the decoder's fixed windows (chunk_frames, chunk_indices);
the store-and-forward ones run on any tree.
"""

from __future__ import annotations

import concurrent.futures
import signal

import grpc
import pytest
import redis

from mmserve.media.samples import make_video
from mmserve.v1 import api_pb2
from mmserve.transport import shm
from services.decoder.engine import FAULT_INJECTION_ENV
from tests.integration.cluster import started_cluster
from tests.integration.helpers import collect, peak_rss_mib, request, reset_peak_rss, text, video
from tests.integration.reference import Reference

pytestmark = pytest.mark.slow

CHUNK_FRAMES = 2  # one temporal group a chunk: a clip sampled at 2 fps has one chunk per second
LEASE_S = 3.0  # unclaimed shared-memory tensors are freed this soon, so leftovers show within the test


@pytest.fixture(scope="module", params=["streamed", "store_and_forward"])
def cluster(request, tiny_model, redis_server, tmp_path_factory):
    with pytest.MonkeyPatch.context() as env:
        env.setenv(FAULT_INJECTION_ENV, "1")  # the decoder's test faults (the deadline case), for its process
        yield from _cluster(request, tiny_model, redis_server, tmp_path_factory.mktemp("media"))


def _cluster(request, tiny_model, redis_server, media_root):
    # The cases count cache hits: Redis gets the time a loaded machine needs (a timeout is a miss).
    running = started_cluster(
        tiny_model, redis_server, registry=False, counts={"decoder": 1, "encoder": 2, "llm": 1},
        stage_options={"decoder": dict(lease_s=LEASE_S, media_root=str(media_root)),
                       "encoder": dict(lease_s=LEASE_S, cache_timeout_ms=5000),
                       # The llm reads cache hits; its own prefix cache would answer a clip seen before without
                       # a decode or a cache read, the cases' subject.
                       "llm": dict(redis_url=redis_server.url, cache_timeout_ms=5000, prefix_caching=False)},
        router_options=dict(stream_prefill=request.param == "streamed", video_chunk_frames=CHUNK_FRAMES,
                            max_chunks_in_flight=2, cache_timeout_ms=5000, media_root=str(media_root)))
    running.mode, running.media_root = request.param, media_root
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def stub(cluster):
    router, channel = cluster.stub()
    yield router
    channel.close()


@pytest.fixture(scope="module")
def reference(tiny_model):
    return Reference(tiny_model)


def clip(cluster, seconds: float, seed: int) -> bytes:
    """A clip of its own per mode, so one mode's cache entries never serve the other's."""
    return make_video(seconds=seconds, fps=30, width=140, height=84, seed=seed + (500 if cluster.mode == "streamed"
                                                                                   else 0))


def emb_keys(redis_server) -> set[bytes]:
    return set(redis.Redis(port=redis_server.port).keys("mmserve:emb:*"))


def assert_all_freed(cluster) -> None:
    """The llm holds no sequence and no KV block, and the decoder's and encoders' shared-memory segments are gone
    (a lease nobody claimed expires after LEASE_S)."""
    llm = cluster.replicas["llm-0"]
    names = ("mmserve_llm_running_sequences", "mmserve_llm_waiting_sequences", "mmserve_llm_kv_blocks_used")
    held = lambda: {n: cluster.metric(n, port=llm.metrics_port) for n in names}  # noqa: E731
    cluster.wait_for(lambda: not any(held().values()), describe=lambda: str(held()))
    prefixes = [shm.owner_prefix(cluster.replicas[name].process.pid) for name in ("decoder-0", "encoder-0",
                                                                                  "encoder-1")]
    segments = lambda: [s for s in shm.list_segments() if any(s.startswith(p) for p in prefixes)]  # noqa: E731
    cluster.wait_for(lambda: not segments(), timeout_s=LEASE_S * 10, describe=lambda: str(segments()))


@pytest.mark.parametrize("seconds", [4.0, 7.0])  # 4 and 7 chunks
def test_tokens_equal_transformers_uncached_then_cached(cluster, stub, reference, redis_server, seconds):
    req = request(video(clip(cluster, seconds, seed=int(seconds))), text("What moves?"), num_tokens=16)
    expected = reference.generate(req, 16)
    before = emb_keys(redis_server)
    first = collect(stub, req)
    assert first.token_ids == expected
    assert first.final.num_media_cached == 0 and first.final.timings.decode_ms > 0
    if cluster.mode == "streamed":  # one entry per fixed window
        assert len(emb_keys(redis_server) - before) == int(seconds * 2) // CHUNK_FRAMES
    second = collect(stub, req)
    assert second.token_ids == expected
    assert second.final.num_media_cached == 1 and second.final.timings.decode_ms == 0


def test_a_partly_cached_clip_decodes_and_encodes_only_the_missing_chunks(cluster, stub, reference, redis_server):
    req = request(video(clip(cluster, 6.0, seed=60)), text("Describe it."), num_tokens=12)
    expected = reference.generate(req, 12)
    before = emb_keys(redis_server)
    assert collect(stub, req).token_ids == expected
    written = sorted(emb_keys(redis_server) - before)
    client = redis.Redis(port=redis_server.port)
    evicted, kept = written[::2], written[1::2]
    client.delete(*evicted)
    for key in kept:
        client.expire(key, 5000)  # marked: an entry written again gets the cache's own TTL
    partly = collect(stub, req)
    assert partly.token_ids == expected
    assert partly.final.num_media_cached == 0 and partly.final.timings.decode_ms > 0
    assert all(client.exists(key) for key in written)
    if cluster.mode == "streamed":  # the cached windows were streamed from the cache, not encoded again
        assert all(0 < client.ttl(key) <= 5000 for key in kept)
        assert all(client.ttl(key) > 5000 for key in evicted)


def test_the_router_s_peak_memory_stays_flat_as_the_clip_doubles(cluster, stub):
    """The router passes refs, never frames or embeddings: a clip twice as long (64 decoded frames, 36 MiB, where
    the shorter had 32) leaves its peak RSS where it was but for the few compressed bytes it was sent."""
    if cluster.mode != "streamed":
        pytest.skip("streamed prefill's bound")
    peaks = []
    for seconds in (16.0, 32.0):
        # 588x336: no resize; a high crf keeps the clip's bytes (what the client sends) small beside its frames.
        data = make_video(seconds=seconds, fps=4, width=588, height=336, seed=70, encoder_options={"crf": "51"})
        assert collect(stub, request(video(data), text("How long is it?"), num_tokens=2)).final.num_media == 1
        peaks.append(peak_rss_mib(cluster.router.process.pid))
    frames_mib = 64 * 588 * 336 * 3 / 2**20
    print(f"router peak RSS MiB after the 16 s and the 32 s clip: {peaks}")
    assert peaks[1] - peaks[0] <= 0.1 * frames_mib, peaks


def test_a_clip_named_by_file_uri_never_passes_through_the_router(cluster, stub, reference):
    """A file:// clip is hashed where it lies and read by the decoder: the router's peak RSS stays where it was
    when the clip's bytes double (8 → 16 MB; sent inline they are held in several copies), and the answer is the one
    its bytes give."""
    peaks = []
    for seconds in (4.0, 8.0):
        # Lossless noise: many bytes, few sampled frames.
        data = make_video(seconds=seconds, fps=30, width=320, height=240, seed=71 + len(cluster.mode),
                          encoder_options={"crf": "0", "preset": "ultrafast"})
        path = cluster.media_root / f"noise-{cluster.mode}-{seconds:g}.mp4"
        path.write_bytes(data)
        clip_by_uri = api_pb2.Part(video=api_pb2.Media(uri=path.as_uri(), max_frames=4))
        reset_peak_rss(cluster.router.process.pid)
        reply = collect(stub, request(clip_by_uri, text("What is it?"), num_tokens=4))
        peaks.append(peak_rss_mib(cluster.router.process.pid))
    print(f"router peak RSS MiB for the 8 MB and the 16 MB clip by uri: {peaks}")
    assert peaks[1] - peaks[0] <= 0.5 * len(data) / 2 / 2**20, peaks
    assert reply.token_ids == reference.generate(request(video(data, max_frames=4), text("What is it?"),
                                                         num_tokens=4), 4)


def _run(stub, req, timeout: float = 120) -> str:
    try:
        collect(stub, req, timeout=timeout)
        return "OK"
    except grpc.RpcError as err:
        return err.code().name


def _long_request(cluster, seed: int):
    return request(video(clip(cluster, 30.0, seed=seed), max_frames=60), text("Tell me everything."),
                   num_tokens=64)


def _frames_handed(cluster) -> float:
    """Tensors the decoder has handed out so far (its frames)."""
    decoder = cluster.replicas["decoder-0"]
    return sum(cluster.metric("mmserve_tensor_refs_total", port=decoder.metrics_port, transport=t)
               for t in ("shared_memory", "remote", "inline_data", "cuda_ipc"))


def _wait_for_frames(cluster, num_before: float) -> None:
    """Until the decoder has handed out frames for the request: its chunks are in flight."""
    cluster.wait_for(lambda: _frames_handed(cluster) > num_before)


def _next_is_served(cluster, stub, reference) -> None:
    req = request(video(clip(cluster, 2.0, seed=7)), text("And now?"), num_tokens=8)
    assert collect(stub, req).token_ids == reference.generate(req, 8)


def test_a_request_cancelled_with_chunks_in_flight_frees_everything(cluster, stub, reference):
    num_before = _frames_handed(cluster)
    stream = stub.Generate(_long_request(cluster, seed=30), timeout=120)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        reading = pool.submit(lambda: list(stream))
        _wait_for_frames(cluster, num_before)
        stream.cancel()
        with pytest.raises(grpc.RpcError) as cancelled:
            reading.result(timeout=60)
    assert cancelled.value.code() == grpc.StatusCode.CANCELLED
    assert_all_freed(cluster)
    _next_is_served(cluster, stub, reference)


def test_a_deadline_that_passes_between_chunks_ends_the_request_and_frees_everything(cluster, stub, reference):
    # The decoder's worker for the second chunk hangs (its fault injection): the first chunks flow, then the
    # deadline passes with the rest outstanding, however fast the machine.
    req = _long_request(cluster, seed=31)
    req.request_id = "fault:hang:1"
    assert _run(stub, req, timeout=15.0) == "DEADLINE_EXCEEDED"
    assert_all_freed(cluster)
    _next_is_served(cluster, stub, reference)


def test_an_encoder_killed_mid_clip_ends_in_one_status_and_frees_everything(cluster, stub, reference):
    num_before = _frames_handed(cluster)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        outcome = pool.submit(_run, stub, _long_request(cluster, seed=32))
        _wait_for_frames(cluster, num_before)
        victim = cluster.replicas["encoder-0"]
        victim.process.send_signal(signal.SIGKILL)
        # Retried on the other encoder where nothing was lost, else UNAVAILABLE naming the encoder.
        assert outcome.result(timeout=120) in ("OK", "UNAVAILABLE")
    victim.process.wait()
    llm = cluster.replicas["llm-0"]
    cluster.wait_for(lambda: not cluster.metric("mmserve_llm_kv_blocks_used", port=llm.metrics_port))
    _next_is_served(cluster, stub, reference)
