"""Qwen3-VL and InternVL through the real decoder and encoder processes (the router's MediaStage in between): the
embeddings, grids and Qwen3-VL timestamps equal the family's own preprocess + encode of the same media."""

from __future__ import annotations

import asyncio
import io
import sys
import time

import PIL.Image
import pytest
import torch

from mmserve import transport
from mmserve.media.fetch import FetchPolicy
from mmserve.media.samples import make_image, make_video
from mmserve.media.video import decode_video, probe_video
from mmserve.models.family import family_of, pack
from mmserve.v1 import api_pb2
from services.decoder.config import DecoderConfig
from services.encoder.config import EncoderConfig
from services.router.config import RouterConfig
from services.router.media import MediaItem, MediaStage
from services.router.pools import build_pools
from stack.launcher import Child
from stack.ports import free_port
from tests.integration.helpers import running

IMAGES = {"small": make_image(width=300, height=200, seed=1), "wide": make_image(width=900, height=500, seed=2)}
CLIP = make_video(seconds=4.0, fps=10, width=96, height=72)


@pytest.fixture(scope="module", params=["qwen3_vl", "internvl"])
def chain(request, tmp_path_factory):
    """A tiny checkpoint of the family, one decoder (2 workers, chunks of any cost) and 2 encoders."""
    from mmserve.models.internvl.tiny import build as build_internvl
    from mmserve.models.qwen3_vl.tiny import build as build_qwen3_vl

    build = {"qwen3_vl": build_qwen3_vl, "internvl": build_internvl}[request.param]
    model = str(build(tmp_path_factory.mktemp(request.param), seed=0))
    common = dict(host="127.0.0.1", log_level="WARNING")
    decoder = DecoderConfig(port=free_port(), model=model, num_workers=2, min_chunk_cost=0, device="cpu", **common)
    encoders = [EncoderConfig(port=free_port(), model=model, dtype="float32", num_threads=1, **common)
                for _ in range(2)]
    children = [Child("decoder", [sys.executable, "-m", "services.decoder", *decoder.to_argv()],
                      f"127.0.0.1:{decoder.port}")]
    children += [Child(f"encoder-{i}", [sys.executable, "-m", "services.encoder", *c.to_argv()],
                       f"127.0.0.1:{c.port}") for i, c in enumerate(encoders)]
    with running(children):
        yield model, f"127.0.0.1:{decoder.port}", ",".join(f"127.0.0.1:{c.port}" for c in encoders)


@pytest.fixture(scope="module")
def reference(chain):
    """The family and its float32 vision tower, in this process."""
    family = family_of(chain[0])
    return family, family.load_vision_tower(chain[0], torch.float32, torch.device("cpu"))


async def _embed(chain, kind: str, data: bytes):
    """The MediaEmbedding the router's media stage makes of one item, with its tensor and chunk count."""
    model, decoders, encoders = chain
    family = family_of(model)
    pools = build_pools(RouterConfig(model=model, decoder_addrs=decoders, encoder_addrs=encoders,
                                     llm_addrs="127.0.0.1:1"))  # no llm is asked
    decoder_pool, encoder_pool, _ = pools
    try:
        await decoder_pool.wait_healthy(60)
        await encoder_pool.wait_healthy(60)
        stage = MediaStage(decoders=decoder_pool, encoders=encoder_pool, cache=None, model_id="test",
                           encoder_dtype="float32", family=family, fetch_policy=FetchPolicy())
        prepared = await stage.prepare(MediaItem(kind, api_pb2.Media(data=data), f"parts[0].{kind}"))
        now = time.perf_counter()
        embedded = await stage.embed("families", prepared, deadline=now + 120, latest_start=now + 120, attempts=1)
        tensor = (await transport.resolve(embedded.embedding.embeddings, 60)).clone()
        return prepared, embedded.embedding, tensor
    finally:
        for pool in pools:
            await pool.close()


def _num_chunks(chain) -> int:
    """Chunks the decoder cuts the clip into."""
    import grpc

    from mmserve.v1 import decoder_pb2, decoder_pb2_grpc

    with grpc.insecure_channel(chain[1]) as channel:
        request = decoder_pb2.DecodeRequest(kind=decoder_pb2.MEDIA_KIND_VIDEO, data=CLIP, **_video_fields(chain))
        return len(list(decoder_pb2_grpc.DecoderStub(channel).Decode(request, timeout=60)))


def _video_fields(chain) -> dict:
    p = family_of(chain[0]).default_params("video")
    return dict(fps=p.fps, min_frames=p.min_frames, max_frames=p.max_frames, min_pixels=p.min_pixels,
                max_pixels=p.max_pixels, total_pixels=p.total_pixels)


def _expected_image(reference, data: bytes):
    family, tower = reference
    pixels, item = family.preprocess_image(PIL.Image.open(io.BytesIO(data)))
    return item, pack(family.encode(tower, pixels, [item])[0])


@pytest.mark.parametrize("names", [["small"], ["small", "wide"]])
def test_images_equal_the_family_in_process(chain, reference, names):
    for name in names:  # each its own item, as two images of one request are
        prepared, embedding, tensor = asyncio.run(_embed(chain, "image", IMAGES[name]))
        item, expected = _expected_image(reference, IMAGES[name])
        assert tuple(embedding.grid_thw) == item.grid and prepared.family_item == item
        assert tensor.shape == expected.shape and (tensor - expected).abs().max().item() == 0.0


def test_a_video_split_over_two_encoders_equals_the_family_in_process(chain, reference):
    family, tower = reference
    prepared, embedding, tensor = asyncio.run(_embed(chain, "video", CLIP))
    info = probe_video(CLIP)
    plan = family.plan_decode("video", prepared.params, info.height, info.width, info.total_frames, info.fps)
    indices = list(plan.frame_indices)
    frames = torch.from_numpy(decode_video(CLIP, indices=indices, size=(info.height, info.width)).frames)  # not resized
    pixels, item = family.preprocess_video(frames, indices, info.fps)
    expected = pack(family.encode(tower, pixels, [item])[0])
    assert _num_chunks(chain) >= 2  # so the chunks spread over both encoders
    assert tuple(embedding.grid_thw) == item.grid and prepared.family_item == item
    assert tuple(embedding.timestamps) == item.timestamps  # Qwen3-VL: one per temporal group; InternVL: none
    # The decoder's frames and the pixel values are exact; chunks encoded apart differ from one pass only in the
    # order of float sums (attention never crosses a temporal group), hence the tolerance.
    assert tensor.shape == expected.shape and (tensor - expected).abs().max().item() <= 1e-5


def test_warm_up_profiles_the_replicas_with_the_familys_image(chain):
    """The router's warm-up decodes its image within the family's bounds (InternVL: one 448-pixel tile) and seeds
    the encoder's cost model with the patches the tower ran on (InternVL's grid is tiles, columns, rows)."""
    from mmserve.media.samples import make_image as sample
    from services.router import warmup

    model, decoders, encoders = chain
    family = family_of(model)

    async def profile():
        pools = build_pools(RouterConfig(model=model, decoder_addrs=decoders, encoder_addrs=encoders,
                                         llm_addrs="127.0.0.1:1"))
        try:
            await pools.decoders.wait_healthy(60)
            await pools.encoders.wait_healthy(60)
            decoder, encoder = pools.decoders.healthy()[0], pools.encoders.healthy()[0]
            observed = []
            encoder.costs.observe = lambda num_patches, ms: observed.append(num_patches)  # what warm-up counts
            frames, grid = await warmup._decode(decoder, sample(width=224, height=224, fmt="PNG"), family)
            await warmup._encode(encoder, frames, grid, family)
            return tuple(frames.shape), observed
        finally:
            for pool in pools:
                await pool.close()

    shape, observed = asyncio.run(profile())
    plan = family.plan_decode("image", family.default_params("image"), 224, 224)
    assert shape == (plan.num_frames, plan.height, plan.width, 3)
    assert observed == [family.num_tokens(plan.item) * family.patches_per_token]
