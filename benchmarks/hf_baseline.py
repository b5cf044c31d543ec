"""The transformers baseline of goodput.py: mmserve's public gRPC API served the way a user would write it.

    python benchmarks/hf_baseline.py --model DIR --port 50070

One process; each Router/Generate request runs `Qwen2_5_VLForConditionalGeneration.generate` in a single
worker thread, one request at a time in arrival order (its media preprocessing too). Its inputs are those of the
parity tests' reference (`mmserve/hf_inputs.py`): images go through transformers' `Qwen2VLImageProcessorPil`;
videos through mmserve's frame sampling (`decode_video`) and `to_pixel_values`, because transformers' video
processor needs torchvision, which cannot be installed beside the CPU torch here. Tokens stream back as
generate makes them, through a `BaseStreamer` (the interface `TextIteratorStreamer` implements) that hands
over each token rather than each word, so the baseline's TTFT is not held back to a word boundary.
Greedy answers equal mmserve's. It ignores SLO fields: plain generate knows none.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import threading
import time

import mmserve  # noqa: F401  (first: turns gRPC's fork handlers off before grpc loads; see its __init__)
import grpc
import torch
from transformers import Qwen2_5_VLForConditionalGeneration, StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from mmserve import rpc
from mmserve.config import ServiceConfig, option
from mmserve.hf_inputs import HfInputs
from mmserve.models import loading
from mmserve.v1 import api_pb2, api_pb2_grpc


@dataclasses.dataclass(frozen=True)
class BaselineConfig(ServiceConfig):
    """transformers generate behind Router/Generate, one request at a time."""

    model: str = option("", "checkpoint directory or hub id")
    dtype: str = option("auto", "auto (as mmserve's services resolve it, so both compute in the same precision), "
                                "float32, bfloat16 or float16")
    num_threads: int = option(0, "torch intra-op threads (0 keeps torch's default)")


class QueueStreamer(BaseStreamer):
    """Hands each generated token to the event loop; the first put is the prompt, which is skipped."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
        self.loop, self.queue, self.is_prompt = loop, queue, True

    def put(self, value: torch.Tensor) -> None:
        if self.is_prompt:
            self.is_prompt = False
            return
        self.loop.call_soon_threadsafe(self.queue.put_nowait, value.reshape(-1).tolist())

    def end(self) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, None)


class Cancelled(StoppingCriteria):
    """Stops generate once the caller has gone away, so an abandoned request does not hold the worker."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool)


class HfModel:
    """Qwen2.5-VL in transformers with its processors: one request's messages → model inputs → generate."""

    def __init__(self, model_dir: str, dtype: str = "auto"):
        dtype = loading.resolve_dtype(dtype, model_dir, torch.device("cpu"))
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).eval()
        self.inputs = HfInputs(model_dir, self.model.config)
        self.tokenizer = self.inputs.tokenizer

    @torch.inference_mode()
    def generate(self, request: api_pb2.GenerateRequest, streamer: QueueStreamer, cancelled: threading.Event) -> int:
        """Preprocesses and generates one request, streaming tokens; returns the prompt length."""
        try:
            inputs = self.inputs.for_request(request)
            s = request.sampling
            greedy = s.HasField("temperature") and s.temperature == 0
            sampling = {"do_sample": False} if greedy else {
                "do_sample": True, "temperature": s.temperature if s.HasField("temperature") else 1.0,
                "top_p": s.top_p if s.HasField("top_p") else 1.0, "top_k": s.top_k or None}
            self.model.generate(**inputs, **sampling, max_new_tokens=s.max_tokens if s.HasField("max_tokens") else 256,
                                min_new_tokens=s.min_tokens or None, streamer=streamer,
                                stopping_criteria=[Cancelled(cancelled)])
            return inputs["input_ids"].shape[1]
        finally:
            streamer.end()


class BaselineServicer(api_pb2_grpc.RouterServicer):
    """Router/Generate on one transformers model: a single worker thread, so requests run one at a time."""

    def __init__(self, model: HfModel):
        self.model = model
        self.worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")

    async def Generate(self, request, context):
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()
        start = time.perf_counter()
        job = loop.run_in_executor(self.worker, self.model.generate, request, QueueStreamer(loop, tokens), cancelled)
        first, num_tokens = None, 0
        try:
            while (ids := await tokens.get()) is not None:
                first = first or time.perf_counter()
                num_tokens += len(ids)
                yield api_pb2.GenerateResponse(delta=api_pb2.Delta(
                    token_ids=ids, text=self.model.tokenizer.decode(ids, skip_special_tokens=True)))
            prompt_tokens = await job
        except asyncio.CancelledError:
            cancelled.set()
            raise
        except Exception as err:  # bad media or a model error, as a user's server would report it
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{type(err).__name__}: {err}")
        end = time.perf_counter()
        ttft_ms = ((first or end) - start) * 1e3
        max_tokens = request.sampling.max_tokens if request.sampling.HasField("max_tokens") else 256
        yield api_pb2.GenerateResponse(final=api_pb2.Final(
            finish_reason="length" if num_tokens >= max_tokens else "stop", prompt_tokens=prompt_tokens,
            completion_tokens=num_tokens, request_id=request.request_id,
            timings=api_pb2.Timings(ttft_ms=ttft_ms, total_ms=(end - start) * 1e3,
                                    tpot_ms=(end - (first or end)) * 1e3 / max(1, num_tokens - 1))))


async def serve(config: BaselineConfig) -> None:
    """Loads the model and serves until SIGTERM."""
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    service = rpc.Service(config, [api_pb2.DESCRIPTOR.services_by_name["Router"].full_name])
    api_pb2_grpc.add_RouterServicer_to_server(BaselineServicer(HfModel(config.model, config.dtype)), service.server)
    await rpc.run_until_signalled(service)


if __name__ == "__main__":
    config = BaselineConfig.parse(prog="hf_baseline")
    rpc.setup_logging(config.log_level)
    asyncio.run(serve(config))
