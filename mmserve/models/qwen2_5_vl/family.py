"""Qwen2.5-VL family: planning from mmserve.media.sizing; torch parts from mmserve.media.preprocess and
mmserve.models.loading, imported when first used."""

from __future__ import annotations

import pathlib

from mmserve.cache_keys import MediaParams
from mmserve.media import sizing
from mmserve.media.sizing import ImageProcessing, linspace_indices, smart_resize
from mmserve.models.family import DecodePlan, EncodedItem, MediaItem, expand_pads, read_config


class Qwen25VL:
    """The Qwen2.5-VL family: 14-pixel patches, window attention per temporal patch, M-RoPE with a time axis."""

    name = "qwen2_5_vl"

    def __init__(self, processing: ImageProcessing, config: dict):
        self.processing = processing
        self.image_token_id, self.video_token_id = config["image_token_id"], config["video_token_id"]
        self.tokens_per_second = config["vision_config"].get("tokens_per_second", 2)
        self.patches_per_token = processing.merge_size ** 2

    def default_params(self, kind: str) -> MediaParams:
        """The processor's pixel bounds for images; qwen-vl-utils' fetch_video defaults for videos."""
        if kind == "image":
            return MediaParams("image", min_pixels=self.processing.min_pixels, max_pixels=self.processing.max_pixels)
        return MediaParams("video", fps=sizing.FPS, min_frames=sizing.FPS_MIN_FRAMES, max_frames=sizing.FPS_MAX_FRAMES,
                           min_pixels=sizing.VIDEO_MIN_PIXELS, max_pixels=sizing.VIDEO_MAX_PIXELS,
                           total_pixels=sizing.VIDEO_TOTAL_PIXELS)

    def plan_decode(self, kind: str, params: MediaParams, height: int, width: int, total_frames: int = 1,
                    video_fps: float = 0.0) -> DecodePlan:
        """smart_resize within the params' bounds; a video keeps smart_nframes frames under a total pixel budget."""
        p = self.processing
        num_frames, max_pixels = 1, params.max_pixels
        if kind == "video":
            num_frames = sizing.smart_nframes(total_frames, video_fps, fps=params.fps, min_frames=params.min_frames,
                                              max_frames=params.max_frames)
            max_pixels = sizing.video_max_pixels(num_frames, min_pixels=params.min_pixels,
                                                 max_pixels=params.max_pixels, total_pixels=params.total_pixels)
        h, w = smart_resize(height, width, p.factor, params.min_pixels, max_pixels)
        num_groups = max(num_frames // p.temporal_patch_size, 1)
        indices = linspace_indices(total_frames, num_frames) if kind == "video" else (0,)
        return DecodePlan(num_frames, h, w, MediaItem(kind, (num_groups, h // p.patch_size, w // p.patch_size)),
                          indices)

    def second_per_grid_t(self, sample_fps: float) -> float:
        """One temporal patch spans temporal_patch_size sampled frames."""
        return self.processing.temporal_patch_size / sample_fps

    def timestamps(self, frame_indices: list[int], video_fps: float) -> tuple[float, ...]:
        """Qwen2.5-VL writes no time into the prompt (M-RoPE's time axis carries it)."""
        return ()

    def image_frames(self, image, plan: DecodePlan):
        """PIL bicubic resize to the plan, as preprocess_image does."""
        from mmserve.media.image import resized_rgb

        return resized_rgb(image, plan.height, plan.width)

    def plan_image(self, height: int, width: int) -> MediaItem:
        """smart_resize to multiples of 28 within the pixel bounds."""
        p = self.processing
        h, w = smart_resize(height, width, p.factor, p.min_pixels, p.max_pixels)
        return MediaItem("image", (1, h // p.patch_size, w // p.patch_size))

    def num_tokens(self, item: MediaItem) -> int:
        """Vision embedding rows of an item."""
        t, h, w = item.grid
        return t * h * w // self.processing.merge_size ** 2

    def chunk_boundaries(self, item: MediaItem) -> list[int]:
        """Attention stays within a temporal patch, so a video may be cut between any two."""
        per_t = self.num_tokens(item) // item.grid[0]
        return [k * per_t for k in range(1, item.grid[0])] if item.kind == "video" else []

    def expand_prompt(self, text: str, items: list[MediaItem]) -> str:
        """Qwen2.5-VL's template already holds one pad per item."""
        return text

    def expand_ids(self, ids: list[int], items: list[MediaItem]) -> list[int]:
        """Each pad repeated to its item's rows."""
        return expand_pads(ids, {self.image_token_id, self.video_token_id}, [self.num_tokens(i) for i in items])

    def preprocess_image(self, image):
        """PIL bicubic resize to the plan, then to_pixel_values (checked against Qwen2VLImageProcessorPil)."""
        from mmserve.models.pixels import pil_resize

        item = self.plan_image(image.height, image.width)
        p = self.processing
        frames = pil_resize(image, item.grid[1] * p.patch_size, item.grid[2] * p.patch_size)
        return self._pixels(frames)[0], item

    def preprocess_video(self, frames, frame_indices: list[int], video_fps: float):
        """Frames already sampled and resized by the decoder (mmserve.media.video) → pixel_values."""
        sample_fps = len(frame_indices) / max(frame_indices[-1] - frame_indices[0] + 1, 1) * video_fps
        pixels, grid = self._pixels(frames)
        return pixels, MediaItem("video", grid, second_per_grid_t=self.processing.temporal_patch_size / sample_fps)

    def preprocess_frames(self, kind: str, frames):
        """Normalise and patchify on the frames' own device (on a GPU they go up once, as uint8)."""
        pixels, grid = self._pixels(frames)
        return pixels, MediaItem(kind, tuple(grid))

    def _pixels(self, frames):
        from mmserve.media.preprocess import to_pixel_values

        p = self.processing
        return to_pixel_values(frames, patch_size=p.patch_size, temporal_patch_size=p.temporal_patch_size,
                               merge_size=p.merge_size, image_mean=p.image_mean, image_std=p.image_std,
                               rescale_factor=p.rescale_factor)

    def load_vision_tower(self, model_dir: str, dtype=None, device=None):
        """models/loading.py's tower-only load."""
        import torch

        from mmserve.models import loading

        return loading.load_vision_tower(model_dir, dtype or torch.float32, device or torch.device("cpu"))

    def load_language_model(self, model_dir: str, dtype=None, device=None):
        """models/loading.py's language-model-only load."""
        import torch

        from mmserve.models import loading

        text, lm_head = loading.load_language_model(model_dir, dtype or torch.float32)
        return text.to(device or "cpu"), lm_head

    def encode(self, tower, pixels, items: list[MediaItem]) -> list[EncodedItem]:
        """One embedding tensor per item."""
        import torch

        with torch.no_grad():
            grid = torch.tensor([item.grid for item in items], device=pixels.device)
            out = tower(pixels.to(tower.dtype), grid_thw=grid, return_dict=True).pooler_output
        return [EncodedItem(e) for e in out.split([self.num_tokens(i) for i in items])]

    def positions(self, ids: list[int], items: list[MediaItem]):
        """3-axis M-RoPE positions: videos advance the time axis by second_per_grid_t * tokens_per_second."""
        import torch

        pads, merge = {self.image_token_id, self.video_token_id}, self.processing.merge_size
        parts, current, i, pending = [], 0, 0, iter(items)
        while i < len(ids):
            if ids[i] in pads:
                item = next(pending)
                t, h, w = item.grid
                gh, gw = h // merge, w // merge
                # Same arithmetic as transformers' get_rope_index (float32 interval, truncation).
                interval = (torch.tensor(item.second_per_grid_t, dtype=torch.float32) * self.tokens_per_second
                            if item.kind == "video" else 1)
                grid = torch.stack(torch.meshgrid((torch.arange(t) * interval).long(), torch.arange(gh) + current,
                                                  torch.arange(gw) + current, indexing="ij")).reshape(3, -1)
                grid[0] += current
                parts.append(grid)
                current += max(gh, gw)
                i += t * gh * gw
                continue
            j = i
            while j < len(ids) and ids[j] not in pads:
                j += 1
            parts.append(torch.arange(j - i).expand(3, -1) + current)
            current, i = current + j - i, j
        out = torch.cat(parts, dim=1)
        return out, int(out.max()) + 1 - len(ids)

    def language_model_inputs(self, embed_tokens, ids, encoded, items) -> dict:
        """inputs_embeds with the item rows at the pads and position_ids [3, 1, N]."""
        import torch

        input_ids = torch.tensor([ids])
        embeds = embed_tokens(input_ids)
        if encoded:
            mask = ((input_ids == self.image_token_id) | (input_ids == self.video_token_id)).unsqueeze(-1)
            embeds = embeds.masked_scatter(mask, torch.cat([e.embeddings for e in encoded]).to(embeds.dtype))
        return dict(inputs_embeds=embeds, position_ids=self.positions(ids, items)[0].unsqueeze(1))


def from_defaults() -> Qwen25VL:
    """The family with the processor's default settings (a decoder started without a checkpoint)."""
    return Qwen25VL(ImageProcessing(), {"image_token_id": -1, "video_token_id": -1, "vision_config": {}})


def from_pretrained(model_dir: str | pathlib.Path) -> Qwen25VL:
    """The Qwen2.5-VL family set up from a checkpoint directory."""
    return Qwen25VL(ImageProcessing.from_pretrained(model_dir), read_config(model_dir))
