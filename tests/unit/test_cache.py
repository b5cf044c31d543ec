"""Embedding cache: value format, key derivation, model fingerprints, and misses when Redis is down."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import struct

import pytest
import torch

from mmserve.cache import CachedEmbedding, EmbeddingCache, decode_value, encode_value
from mmserve.cache_keys import MediaParams, encoder_id, media_key, model_fingerprint
from mmserve.models import loading
from mmserve.models.dtypes import cpu_dtype_name
from mmserve.transport import from_ref, to_ref

UNREACHABLE_REDIS = "redis://127.0.0.1:1/0"  # nothing listens on port 1
SHA = hashlib.sha256(b"some image").hexdigest()
PARAMS = MediaParams(kind="video", fps=2.0, min_frames=4, max_frames=768, min_pixels=3136, max_pixels=12845056,
                     total_pixels=90316800)


def entry(dtype=torch.float32, rows: int = 6, grid=(1, 4, 6), second_per_grid_t: float = 0.0) -> CachedEmbedding:
    embeddings = torch.arange(rows * 8, dtype=torch.float32).reshape(rows, 8).to(dtype)
    return CachedEmbedding(to_ref(embeddings), grid, second_per_grid_t)


# --- value format -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_value_round_trip(dtype):
    item = entry(dtype, rows=12, grid=(2, 4, 6), second_per_grid_t=0.7)
    back = decode_value(encode_value(item))
    assert back is not None
    assert back.grid_thw == (2, 4, 6) and isinstance(back.grid_thw, tuple)
    assert back.second_per_grid_t == 0.7
    assert back.embeddings.dtype == item.embeddings.dtype
    assert list(back.embeddings.shape) == [12, 8]
    assert torch.equal(from_ref(back.embeddings), from_ref(item.embeddings))


def test_value_round_trip_of_an_empty_tensor():
    item = CachedEmbedding(to_ref(torch.zeros(0, 8)), (1, 0, 0), 0.0)
    back = decode_value(encode_value(item))
    assert back is not None and from_ref(back.embeddings).shape == (0, 8)


@pytest.mark.parametrize("blob", [b"", b"MMEC", b"\x00" * 9, b"not a cache entry at all, just bytes",
                                  bytes(range(256))])
def test_decode_garbage_is_none(blob):
    assert decode_value(blob) is None


def test_decode_wrong_magic_is_none():
    blob = encode_value(entry())
    assert decode_value(b"XXXX" + blob[4:]) is None


@pytest.mark.parametrize("version", [0, 2, 255])
def test_decode_other_version_is_none(version):
    blob = encode_value(entry())
    assert blob[4] == 1
    assert decode_value(blob[:4] + bytes([version]) + blob[5:]) is None


@pytest.mark.parametrize("corrupt", [
    lambda blob: blob[:12],  # header cut short
    lambda blob: blob[:9] + b"{" * (len(blob) - 9),  # header is not JSON
    lambda blob: blob[:5] + struct.pack("<I", 2) + b"{}" + blob[-16:],  # JSON without the fields
])
def test_decode_corrupt_entry_with_valid_prefix_is_none(corrupt):
    assert decode_value(corrupt(encode_value(entry()))) is None


# --- keys ---------------------------------------------------------------------------------------------------------

def key(**changes) -> str:
    args = {"data_sha256": SHA, "model_id": "abc123", "params": PARAMS, "chunk_index": 0} | changes
    return media_key(args["data_sha256"], args["model_id"], args["params"], args["chunk_index"])


def test_same_inputs_same_key():
    assert key() == key() == media_key(SHA, "abc123", dataclasses.replace(PARAMS), 0)
    assert key().startswith("mmserve:emb:v1:")


def test_chunk_index_defaults_to_zero():
    assert media_key(SHA, "abc123", PARAMS) == key()


PARAM_CHANGES = {"kind": "image", "fps": 2.5, "min_frames": 5, "max_frames": 767, "min_pixels": 3137,
                 "max_pixels": 12845055, "total_pixels": 90316801}


def test_every_media_param_is_covered_by_a_change():
    assert set(PARAM_CHANGES) == {f.name for f in dataclasses.fields(MediaParams)}


@pytest.mark.parametrize("field", sorted(PARAM_CHANGES))
def test_changing_a_media_param_changes_the_key(field):
    assert key(params=dataclasses.replace(PARAMS, **{field: PARAM_CHANGES[field]})) != key()


@pytest.mark.parametrize("change", [
    {"data_sha256": hashlib.sha256(b"another image").hexdigest()},
    {"model_id": "abc124"},
    {"chunk_index": 1},
])
def test_changing_media_model_or_chunk_changes_the_key(change):
    assert key(**change) != key()


def test_all_single_changes_give_distinct_keys():
    keys = [key(), key(chunk_index=1), key(chunk_index=2), key(model_id="other"), key(data_sha256="0" * 64)]
    keys += [key(params=dataclasses.replace(PARAMS, **{f: v})) for f, v in PARAM_CHANGES.items()]
    assert len(set(keys)) == len(keys)


# --- model fingerprint --------------------------------------------------------------------------------------------

@pytest.fixture
def checkpoint(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 64}')
    (tmp_path / "model.safetensors").write_bytes(b"\x01" * 4096)
    return tmp_path


def test_fingerprint_is_stable(checkpoint):
    assert model_fingerprint(str(checkpoint)) == model_fingerprint(str(checkpoint))


def test_fingerprint_changes_with_weight_bytes(checkpoint):
    before = model_fingerprint(str(checkpoint))
    weights = bytearray((checkpoint / "model.safetensors").read_bytes())
    weights[2048] ^= 0xFF  # same size, one byte different
    (checkpoint / "model.safetensors").write_bytes(bytes(weights))
    assert model_fingerprint(str(checkpoint)) != before


def test_fingerprint_changes_with_config(checkpoint):
    before = model_fingerprint(str(checkpoint))
    (checkpoint / "config.json").write_text('{"hidden_size": 65}')
    assert model_fingerprint(str(checkpoint)) != before


def test_fingerprint_ignores_unrelated_files(checkpoint):
    before = model_fingerprint(str(checkpoint))
    (checkpoint / "README.md").write_text("notes")
    assert model_fingerprint(str(checkpoint)) == before


def test_fingerprint_of_a_hub_id_depends_on_the_id():
    assert model_fingerprint("Qwen/Qwen2.5-VL-3B-Instruct") != model_fingerprint("Qwen/Qwen2.5-VL-7B-Instruct")


def test_fingerprint_of_the_tiny_checkpoint_changes_with_its_weights(tiny_model, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(tiny_model, copy)
    before = model_fingerprint(str(copy))
    weights = next(copy.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    assert model_fingerprint(str(copy)) != before


# --- Redis unavailable --------------------------------------------------------------------------------------------

async def test_unreachable_redis_reads_as_a_miss_and_puts_fail():
    cache = EmbeddingCache(UNREACHABLE_REDIS, timeout_s=0.05)
    try:
        assert await cache.get("mmserve:emb:v1:missing") is None
        assert cache.num_errors == 1
        assert await cache.put("mmserve:emb:v1:missing", entry()) is False
        assert cache.num_errors == 2
        assert await cache.get("mmserve:emb:v1:missing") is None
        assert cache.num_errors == 3
    finally:
        await cache.close()


def test_header_only_decoding_reads_no_tensor_bytes():
    item = CachedEmbedding(to_ref(torch.randn(40, 8)), (1, 10, 16), 0.5)
    blob = encode_value(item)
    header = decode_value(blob[:len(blob) - 40 * 8 * 4], header_only=True)
    assert header is not None and header.grid_thw == item.grid_thw
    assert header.embeddings.dtype == "float32" and list(header.embeddings.shape) == [40, 8]
    assert header.embeddings.WhichOneof("location") is None
    assert decode_value(blob[:10], header_only=True) is None


def test_encoder_dtype_and_family_change_the_key():
    """A fleet mixing float32 and bfloat16 encoders (or two families of one checkpoint id) shares no entries."""
    f32, bf16 = encoder_id("abc123", "qwen2_5_vl", "float32"), encoder_id("abc123", "qwen2_5_vl", "bfloat16")
    other_family = encoder_id("abc123", "qwen3_vl", "float32")
    assert len({key(model_id=f32), key(model_id=bf16), key(model_id=other_family)}) == 3
    assert key(model_id=f32) == key(model_id=encoder_id("abc123", "qwen2_5_vl", "float32"))


@pytest.mark.parametrize("name, declared, flags, expected", [
    ("float32", "bfloat16", {"avx512_bf16"}, "float32"),  # an explicit --dtype is taken as given
    ("auto", "bfloat16", {"avx512_bf16"}, "bfloat16"),
    ("auto", "bfloat16", {"avx2"}, "float32"),  # no hardware bfloat16: the encoders compute in float32
    ("auto", "float32", {"amx_bf16"}, "float32"),
])
def test_the_router_resolves_the_encoders_dtype_as_they_do(tmp_path, name, declared, flags, expected):
    (tmp_path / "config.json").write_text(f'{{"model_type": "qwen2_5_vl", "dtype": "{declared}"}}')
    assert cpu_dtype_name(name, str(tmp_path), flags) == expected
    assert loading.resolve_dtype(name, str(tmp_path), torch.device("cpu"), flags) == getattr(torch, expected)
