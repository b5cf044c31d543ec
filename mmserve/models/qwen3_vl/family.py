"""Qwen3-VL planning in plain Python (resize rules, frame sampling, timestamps, placeholders); torch parts are
imported from vision.py and prompt.py when first used."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

from mmserve.cache_keys import MediaParams
from mmserve.media.sizing import smart_resize
from mmserve.models.family import DecodePlan, EncodedItem, MediaItem, expand_pads, read_config, replace_each


@dataclasses.dataclass(frozen=True)
class Settings:
    """Qwen3-VL processor settings (preprocessor_config.json, video_preprocessor_config.json, config.json)."""

    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    min_pixels: int = 65536
    max_pixels: int = 16777216
    video_min_pixels: int = 4096
    video_max_pixels: int = 25165824
    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768

    @property
    def factor(self) -> int:
        """Spatial alignment of resized media (patch_size * merge_size)."""
        return self.patch_size * self.merge_size


def _json(path: pathlib.Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def load_settings(model_dir: str | pathlib.Path) -> Settings:
    """Settings of a checkpoint directory; the processor files fall back to the real model's defaults."""
    root = pathlib.Path(model_dir)
    config = read_config(root)
    image = _json(root / "preprocessor_config.json")
    video = _json(root / "video_preprocessor_config.json")
    image_size, video_size = image.get("size") or {}, video.get("size") or {}
    defaults = Settings(0, 0, 0, 0)
    return Settings(
        image_token_id=config["image_token_id"], video_token_id=config["video_token_id"],
        vision_start_token_id=config["vision_start_token_id"], vision_end_token_id=config["vision_end_token_id"],
        patch_size=int(image.get("patch_size", defaults.patch_size)),
        temporal_patch_size=int(image.get("temporal_patch_size", defaults.temporal_patch_size)),
        merge_size=int(image.get("merge_size", defaults.merge_size)),
        image_mean=tuple(image.get("image_mean", defaults.image_mean)),
        image_std=tuple(image.get("image_std", defaults.image_std)),
        min_pixels=int(image_size.get("shortest_edge", defaults.min_pixels)),
        max_pixels=int(image_size.get("longest_edge", defaults.max_pixels)),
        video_min_pixels=int(video_size.get("shortest_edge", defaults.video_min_pixels)),
        video_max_pixels=int(video_size.get("longest_edge", defaults.video_max_pixels)),
        fps=float(video.get("fps", defaults.fps)),
        min_frames=int(video.get("min_frames", defaults.min_frames)),
        max_frames=int(video.get("max_frames", defaults.max_frames)),
    )


def video_resize(num_frames: int, height: int, width: int, factor: int, temporal_factor: int,
                 min_pixels: float, max_pixels: float) -> tuple[int, int]:
    """Frame size of a video (Qwen3-VL video processor rule: the pixel budget covers all frames)."""
    if num_frames < temporal_factor:
        raise ValueError(f"video: {num_frames} frames, at least {temporal_factor} are needed")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"video: aspect ratio of {width}x{height} exceeds 200")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


class Qwen3VL:
    """The Qwen3-VL family (dense and MoE text models share everything here)."""

    name = "qwen3_vl"
    image_pad, video_pad = "<|image_pad|>", "<|video_pad|>"
    vision_start, vision_end = "<|vision_start|>", "<|vision_end|>"

    def __init__(self, settings: Settings):
        self.settings = settings
        self.patches_per_token = settings.merge_size ** 2

    # -- planning ------------------------------------------------------------------------------------------
    def plan_image(self, height: int, width: int) -> MediaItem:
        """Resize to multiples of 32 within the pixel bounds; one temporal patch."""
        s = self.settings
        h, w = smart_resize(height, width, s.factor, s.min_pixels, s.max_pixels)
        return MediaItem("image", (1, h // s.patch_size, w // s.patch_size))

    def sample_frames(self, total_frames: int, video_fps: float, fps: float = 0.0, min_frames: int = 0,
                      max_frames: int = 0) -> list[int]:
        """Indices of the frames to keep (Qwen3VLVideoProcessor.sample_frames; unset bounds: the configured ones)."""
        s = self.settings
        n = int(total_frames / video_fps * (fps or s.fps))
        n = min(max(n, min_frames or s.min_frames), max_frames or s.max_frames, total_frames)
        if n == 1:
            return [0]
        step = (total_frames - 1) / (n - 1)
        return [int(round(i * step)) for i in range(n)]

    def frame_size(self, num_frames: int, height: int, width: int, min_pixels: int = 0,
                   max_pixels: int = 0) -> tuple[int, int]:
        """(height, width) every sampled frame is resized to (unset bounds: the configured ones)."""
        s = self.settings
        return video_resize(num_frames, height, width, s.factor, s.temporal_patch_size,
                            min_pixels or s.video_min_pixels, max_pixels or s.video_max_pixels)

    def plan_video(self, frame_indices: list[int], video_fps: float, height: int, width: int) -> MediaItem:
        """The item of sampled frames of a clip at video_fps, with one timestamp per temporal group."""
        h, w = self.frame_size(len(frame_indices), height, width)
        return self._video_item(frame_indices, video_fps, h, w)

    def _video_item(self, frame_indices: list[int], video_fps: float, height: int, width: int) -> MediaItem:
        s = self.settings
        num_groups = -(-len(frame_indices) // s.temporal_patch_size)
        return MediaItem("video", (num_groups, height // s.patch_size, width // s.patch_size),
                         timestamps=self.timestamps(frame_indices, video_fps))

    def timestamps(self, frame_indices: list[int], video_fps: float) -> tuple[float, ...]:
        """Mid-time in seconds of each temporal group (the last frame repeated to fill the last group), as
        Qwen3VLProcessor writes before each group."""
        tp = self.settings.temporal_patch_size
        padded = list(frame_indices) + [frame_indices[-1]] * ((-len(frame_indices)) % tp)
        seconds = [i / video_fps for i in padded]
        return tuple((seconds[i] + seconds[i + tp - 1]) / 2 for i in range(0, len(seconds), tp))

    def default_params(self, kind: str) -> MediaParams:
        """The processors' own bounds: image pixels; video fps, frame counts and the pixel budget of all frames
        (total_pixels). A video's max_pixels bounds one frame, as for every family (the image bound: the budget
        alone never reaches it, so by default the plan is the video processor's)."""
        s = self.settings
        if kind == "image":
            return MediaParams("image", min_pixels=s.min_pixels, max_pixels=s.max_pixels)
        return MediaParams("video", fps=s.fps, min_frames=s.min_frames, max_frames=s.max_frames,
                           max_pixels=s.max_pixels, total_pixels=s.video_max_pixels)

    def plan_decode(self, kind: str, params: MediaParams, height: int, width: int, total_frames: int = 1,
                    video_fps: float = 0.0) -> DecodePlan:
        """An image resized within the params' pixel bounds; a video's sample_frames at the params' fps and
        frame bounds, each frame resized by frame_size within the budget of all frames (total_pixels), then into
        the per-frame bounds (min_pixels, max_pixels) when it falls outside them, with its timestamps."""
        s = self.settings
        if kind == "image":
            h, w = smart_resize(height, width, s.factor, params.min_pixels, params.max_pixels)
            return DecodePlan(1, h, w, MediaItem("image", (1, h // s.patch_size, w // s.patch_size)))
        indices = self.sample_frames(total_frames, video_fps, params.fps, params.min_frames, params.max_frames)
        h, w = self.frame_size(len(indices), height, width, max_pixels=params.total_pixels)
        max_pixels = params.max_pixels or s.max_pixels
        if not params.min_pixels <= h * w <= max_pixels:
            h, w = smart_resize(height, width, s.factor, params.min_pixels, max_pixels)
        return DecodePlan(len(indices), h, w, self._video_item(indices, video_fps, h, w), tuple(indices))

    def second_per_grid_t(self, sample_fps: float) -> float:
        """0: Qwen3-VL writes each group's time into the prompt instead of stretching M-RoPE's time axis."""
        return 0.0

    def image_frames(self, image, plan: DecodePlan):
        """PIL bicubic resize to the plan, as preprocess_image does."""
        from mmserve.media.image import resized_rgb

        return resized_rgb(image, plan.height, plan.width)

    def tokens_per_group(self, item: MediaItem) -> int:
        """Rows of one temporal group (the whole of an image)."""
        _, h, w = item.grid
        return h * w // self.settings.merge_size ** 2

    def num_tokens(self, item: MediaItem) -> int:
        """Vision embedding rows of an item."""
        return item.grid[0] * self.tokens_per_group(item)

    def chunk_boundaries(self, item: MediaItem) -> list[int]:
        """Vision attention stays within one temporal group, so a video may be cut between any two groups."""
        n = self.tokens_per_group(item)
        return [g * n for g in range(1, item.grid[0])] if item.kind == "video" else []

    def expand_prompt(self, text: str, items: list[MediaItem]) -> str:
        """Each video placeholder becomes '<t seconds><|vision_start|><|video_pad|><|vision_end|>' per group."""
        videos = ["".join(f"<{t:.1f} seconds>{self.vision_start}{self.video_pad}{self.vision_end}"
                          for t in item.timestamps) for item in items if item.kind == "video"]
        return replace_each(text, self.video_pad, videos)

    def group_counts(self, items: list[MediaItem]) -> list[int]:
        """Rows of each pad token of an expanded prompt, in prompt order."""
        return [self.tokens_per_group(item) for item in items for _ in range(item.grid[0])]

    def expand_ids(self, ids: list[int], items: list[MediaItem]) -> list[int]:
        """Each pad token repeated to the rows of its group."""
        s = self.settings
        return expand_pads(ids, {s.image_token_id, s.video_token_id}, self.group_counts(items))

    # -- torch side ----------------------------------------------------------------------------------------
    def preprocess_frames(self, kind: str, frames):
        """The decoder's resized uint8 frames → (pixel values, item) as preprocess_image / preprocess_video make
        them (timestamps left to the router, which knows the frames' place in the clip)."""
        from mmserve.models.qwen3_vl import frames as decoded

        return decoded.preprocess_frames(self, kind, frames)

    def preprocess_image(self, image):
        """A PIL image → (pixel_values [patches, 3*2*16*16], item), as Qwen2VLImageProcessorPil with 16-px patches."""
        from mmserve.models.qwen3_vl import vision

        return vision.preprocess_image(self, image)

    def preprocess_video(self, frames, frame_indices: list[int], video_fps: float):
        """Sampled uint8 [T,H,W,3] frames → (pixel_values_videos, item)."""
        from mmserve.models.qwen3_vl import vision

        return vision.preprocess_video(self, frames, frame_indices, video_fps)

    def load_vision_tower(self, model_dir: str, dtype=None, device=None):
        """Only the vision tower (blocks, merger, DeepStack mergers) of the checkpoint."""
        from mmserve.models.qwen3_vl import vision

        return vision.load_vision_tower(model_dir, dtype, device)

    def load_language_model(self, model_dir: str, dtype=None, device=None):
        """Only the text model and its lm_head weight."""
        from mmserve.models.qwen3_vl import prompt

        return prompt.load_language_model(model_dir, dtype, device)

    def encode(self, tower, pixels, items: list[MediaItem]) -> list[EncodedItem]:
        """Merger output plus DeepStack features of each item."""
        from mmserve.models.qwen3_vl import vision

        return vision.encode(tower, pixels, items)

    def positions(self, ids: list[int], items: list[MediaItem]):
        """Qwen3-VL's 3-axis positions ([3, N]) and rope delta."""
        from mmserve.models.qwen3_vl import prompt

        return prompt.positions(self, ids, items)

    def language_model_inputs(self, embed_tokens, ids, encoded, items) -> dict:
        """inputs_embeds, position_ids [4,1,N], visual_pos_masks and deepstack_visual_embeds."""
        from mmserve.models.qwen3_vl import prompt

        return prompt.language_model_inputs(self, embed_tokens, ids, encoded, items)


def from_pretrained(model_dir: str | pathlib.Path) -> Qwen3VL:
    """The Qwen3-VL family set up from a checkpoint directory."""
    return Qwen3VL(load_settings(model_dir))
