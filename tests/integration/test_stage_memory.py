"""Each stage loads only its own weights: the encoder's memory grows by the vision tower, not the model."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mmserve.models.tiny import build_tiny_model

_MEASURE = """
import gc, sys, psutil
from mmserve.models import loading
process = psutil.Process()
gc.collect(); before = process.memory_info().rss
loaded = loading.{loader}(sys.argv[1])
modules = loaded if isinstance(loaded, tuple) else (loaded,)
# Touch every weight: memory-mapped pages count only once read.
sum(float(t.sum()) for m in modules for t in (m.parameters() if hasattr(m, "parameters") else [m]))
gc.collect(); print(process.memory_info().rss - before)
"""


@pytest.fixture(scope="module")
def real_vocab_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("real-vocab"), preset="tiny-real-vocab")


def _rss_growth(loader: str, model) -> int:
    out = subprocess.run([sys.executable, "-c", _MEASURE.format(loader=loader), str(model)],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def test_encoder_loads_the_vision_tower_only(real_vocab_model):
    import torch
    from safetensors import safe_open

    with safe_open(str(real_vocab_model / "model.safetensors"), "pt") as f:
        sizes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    nbytes = {k: 4 * torch.Size(shape).numel() for k, shape in sizes.items()}
    vision = sum(v for k, v in nbytes.items() if "visual" in k)
    text = sum(nbytes.values()) - vision
    assert text > 250e6 and vision < 1e6

    vision_growth = _rss_growth("load_vision_tower", real_vocab_model)
    text_growth = _rss_growth("load_language_model", real_vocab_model)
    assert vision_growth < 0.2 * text, f"the encoder grew by {vision_growth / 1e6:.0f} MB"
    assert text_growth > 0.8 * text, f"the llm grew by only {text_growth / 1e6:.0f} MB"


_MEASURE_PROJECTIONS = """
import gc, sys, psutil, torch
from mmserve.models import loading
from services.llm.block_manager import BlockManager
from services.llm.projections import packs_exactly
from services.llm.runner import ModelRunner
process = psutil.Process()
text_model, lm_head = loading.load_language_model(sys.argv[1], dtype=torch.bfloat16)
sum(float(p.sum()) for p in text_model.parameters())
packs_exactly(torch.bfloat16)  # its first packed matmul maps oneDNN's code: not the weights' memory
gc.collect(); before = process.memory_info().rss
runner = ModelRunner(text_model, lm_head, BlockManager(num_blocks=4, block_size=16), torch.bfloat16)
weights = [p.weight for layer in runner.projections for p in (layer.qkv, layer.o, layer.gate_up, layer.down)]
assert all(w.is_mkldnn for w in weights) == (sys.argv[2] == "packed"), "packed" if weights[0].is_mkldnn else "plain"
gc.collect(); print(sum(w.nbytes for w in weights), process.memory_info().rss - before)
"""


def test_the_llm_holds_its_projections_weights_once(tmp_path):
    """Fusing each layer's q, k, v and gate, up copies them into one weight, and packing them (a CPU with bfloat16)
    copies every weight: the copies' memory is given back."""
    from services.llm.projections import packs_exactly

    model = build_tiny_model(tmp_path / "small", preset="small")  # whose layers, not its vocabulary, weigh
    packed = "packed" if packs_exactly(torch.bfloat16) else "plain"
    out = subprocess.run([sys.executable, "-c", _MEASURE_PROJECTIONS, str(model), packed], capture_output=True,
                         text=True, check=True)
    weights, growth = map(int, out.stdout.split())
    assert weights > 30e6
    assert growth < 0.25 * weights, f"the llm grew by {growth / 1e6:.0f} MB with {weights / 1e6:.0f} MB of weights"
