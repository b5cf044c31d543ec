"""InternVL planning in plain Python (tiling canvas, frame sampling, placeholders); torch parts are imported from
vision.py and prompt.py when first used."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np

from mmserve.cache_keys import MediaParams
from mmserve.models.family import DecodePlan, EncodedItem, MediaItem, expand_pads, read_config, replace_each


@dataclasses.dataclass(frozen=True)
class Settings:
    """InternVL processor settings (preprocessor_config.json, video_preprocessor_config.json, config.json)."""

    image_token_id: int
    tokens_per_tile: int = 256
    tile_size: int = 448
    min_tiles: int = 1
    max_tiles: int = 12
    image_mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    image_std: tuple[float, ...] = (0.229, 0.224, 0.225)
    num_frames: int = 8
    patches_per_token: int = 4  # pixel shuffle by downsample_ratio: (1 / ratio)² patches in one row


def load_settings(model_dir: str | pathlib.Path) -> Settings:
    """Settings of a checkpoint directory; missing processor files fall back to InternVL3's defaults."""
    root = pathlib.Path(model_dir)
    config = read_config(root)
    image_path, video_path = root / "preprocessor_config.json", root / "video_preprocessor_config.json"
    image = json.loads(image_path.read_text()) if image_path.is_file() else {}
    video = json.loads(video_path.read_text()) if video_path.is_file() else {}
    defaults = Settings(0)
    return Settings(
        image_token_id=config["image_token_id"],
        tokens_per_tile=int(config.get("image_seq_length", defaults.tokens_per_tile)),
        tile_size=int((image.get("size") or {}).get("height", defaults.tile_size)),
        min_tiles=int(image.get("min_patches", defaults.min_tiles)),
        max_tiles=int(image.get("max_patches", defaults.max_tiles)),
        image_mean=tuple(image.get("image_mean", defaults.image_mean)),
        image_std=tuple(image.get("image_std", defaults.image_std)),
        num_frames=int(video.get("num_frames") or defaults.num_frames),
        patches_per_token=round(1 / float(config.get("downsample_ratio", 0.5)) ** 2),
    )


def tile_grid(height: int, width: int, tile: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """(columns, rows) of the tile canvas closest in aspect ratio to the image (GotOcr2 / InternVL rule: on a
    tie the canvas with more tiles wins while the image covers more than half of it)."""
    grids = sorted(((w, h) for w in range(1, max_tiles + 1) for h in range(1, max_tiles + 1)
                    if min_tiles <= w * h <= max_tiles), key=lambda g: g[0] * g[1])
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for grid in grids:
        diff = abs(aspect - grid[0] / grid[1])
        if diff < best_diff:
            best, best_diff = grid, diff
        elif diff == best_diff and area > 0.5 * tile * tile * grid[0] * grid[1]:
            best = grid
    return best


class InternVL:
    """The InternVL family (transformers' InternVLForConditionalGeneration layout)."""

    name = "internvl"
    context, start, end, video = "<IMG_CONTEXT>", "<img>", "</img>", "<video>"

    def __init__(self, settings: Settings):
        self.settings = settings
        self.patches_per_token = settings.patches_per_token

    # -- planning ------------------------------------------------------------------------------------------
    def plan_image(self, height: int, width: int, max_tiles: int = 0) -> MediaItem:
        """columns x rows tiles of the canvas, plus a thumbnail when there is more than one; grid (tiles, cols, rows).
        max_tiles: at most this many canvas tiles (unset: the configured bound)."""
        s = self.settings
        max_tiles = max_tiles or s.max_tiles
        cols, rows = tile_grid(height, width, s.tile_size, s.min_tiles, max_tiles)
        if max_tiles <= 1:
            cols, rows = 1, 1
        return MediaItem("image", (cols * rows + (cols * rows > 1), cols, rows))

    def default_params(self, kind: str) -> MediaParams:
        """Images: the canvas' pixel bounds (min and max tiles of tile_size squared); videos: num_frames tiles."""
        s = self.settings
        tile = s.tile_size * s.tile_size
        if kind == "image":
            return MediaParams("image", min_pixels=s.min_tiles * tile, max_pixels=s.max_tiles * tile)
        return MediaParams("video", max_frames=s.num_frames, min_pixels=tile, max_pixels=tile)

    def plan_decode(self, kind: str, params: MediaParams, height: int, width: int, total_frames: int = 1,
                    video_fps: float = 0.0) -> DecodePlan:
        """An image: plan_image with at most max_pixels // tile_size² canvas tiles, every tile (and the thumbnail)
        one tile_size frame; a video: sample_frames of max_frames (at most the clip's), each resized to one tile."""
        s = self.settings
        if kind == "image":
            max_tiles = min(s.max_tiles, max(s.min_tiles, params.max_pixels // s.tile_size ** 2))
            item = self.plan_image(height, width, max_tiles if params.max_pixels else 0)
            return DecodePlan(item.grid[0], s.tile_size, s.tile_size, item, tuple(range(item.grid[0])))
        num_frames = min(params.max_frames or s.num_frames, total_frames)
        indices = self.sample_frames(total_frames, num_frames)
        return DecodePlan(num_frames, s.tile_size, s.tile_size, self.plan_video(num_frames), tuple(indices))

    def second_per_grid_t(self, sample_fps: float) -> float:
        """0: InternVL's positions have no time axis."""
        return 0.0

    def timestamps(self, frame_indices: list[int], video_fps: float) -> tuple[float, ...]:
        """InternVL labels frames 'FrameN:' and writes no time."""
        return ()

    def image_frames(self, image, plan: DecodePlan):
        """The plan's tiles of the canvas, then the thumbnail, each tile_size square (preprocess_image's resize)."""
        return self.tiles(image, plan.item)

    def tiles(self, image, item: MediaItem) -> np.ndarray:
        """uint8 [tiles, tile, tile, 3]: the canvas (PIL bicubic) cut row by row, then a thumbnail of the whole
        image."""
        from mmserve.media.image import resized_rgb

        s, (num_tiles, cols, rows) = self.settings, item.grid
        canvas = resized_rgb(image, rows * s.tile_size, cols * s.tile_size)[0]
        tiles = canvas.reshape(rows, s.tile_size, cols, s.tile_size, 3).transpose(0, 2, 1, 3, 4).reshape(
            rows * cols, s.tile_size, s.tile_size, 3)
        if num_tiles > rows * cols:
            tiles = np.concatenate([tiles, resized_rgb(image, s.tile_size, s.tile_size)])
        return np.ascontiguousarray(tiles)

    def sample_frames(self, total_frames: int, num_frames: int | None = None) -> list[int]:
        """num_frames indices from the middle of equal segments (InternVLVideoProcessor.sample_frames)."""
        n = num_frames or self.settings.num_frames
        if n > total_frames:
            raise ValueError(f"video: cannot sample {n} frames from a clip of {total_frames}")
        step = total_frames / n
        return [int(step / 2 + i * step) for i in range(n)]

    def plan_video(self, num_frames: int) -> MediaItem:
        """Each sampled frame is one tile, labelled 'FrameN:' in the prompt."""
        return MediaItem("video", (num_frames, 1, 1))

    def num_tokens(self, item: MediaItem) -> int:
        """Vision embedding rows of an item: tokens_per_tile per tile or frame."""
        return item.grid[0] * self.settings.tokens_per_tile

    def chunk_boundaries(self, item: MediaItem) -> list[int]:
        """Frames are encoded independently, so a video may be cut between any two frames."""
        n = self.settings.tokens_per_tile
        return [k * n for k in range(1, item.grid[0])] if item.kind == "video" else []

    def expand_prompt(self, text: str, items: list[MediaItem]) -> str:
        """'<IMG_CONTEXT>' of an image → '<img>' + one pad per tile + '</img>'; '<video>' → one labelled image
        per frame, as InternVLProcessor writes them."""
        images = [self.start + self.context * item.grid[0] + self.end for item in items if item.kind == "image"]
        text = replace_each(text, self.context, images)
        videos = ["\n".join(f"Frame{i + 1}: {self.start}{self.context}{self.end}" for i in range(item.grid[0]))
                  for item in items if item.kind == "video"]
        return replace_each(text, self.video, videos)

    def expand_ids(self, ids: list[int], items: list[MediaItem]) -> list[int]:
        """Each pad token repeated to tokens_per_tile rows."""
        num_pads = sum(item.grid[0] for item in items)
        return expand_pads(ids, {self.settings.image_token_id}, [self.settings.tokens_per_tile] * num_pads)

    # -- torch side ----------------------------------------------------------------------------------------
    def preprocess_frames(self, kind: str, frames):
        """The decoder's tiles (images: canvas tiles then thumbnail) or resized frames → (pixel values, item) as
        preprocess_image / preprocess_video make them; an image's grid is (tiles, 0, 0): the tiles alone do not
        tell the canvas' columns and rows."""
        from mmserve.models.internvl import frames as decoded

        return decoded.preprocess_frames(self, kind, frames)

    def preprocess_image(self, image):
        """A PIL image → (pixel_values [tiles, 3, 448, 448], item), as GotOcr2ImageProcessorPil with crop_to_patches."""
        from mmserve.models.internvl import vision

        return vision.preprocess_image(self, image)

    def preprocess_video(self, frames, frame_indices=None, video_fps=None):
        """Sampled uint8 [T,H,W,3] frames → (pixel_values [T, 3, 448, 448], item)."""
        from mmserve.models.internvl import vision

        return vision.preprocess_video(self, frames)

    def load_vision_tower(self, model_dir: str, dtype=None, device=None):
        """InternViT plus the pixel-shuffle MLP projector, from the checkpoint's tensors only."""
        from mmserve.models.internvl import vision

        return vision.load_vision_tower(model_dir, dtype, device)

    def load_language_model(self, model_dir: str, dtype=None, device=None):
        """Only the text model and its lm_head weight."""
        from mmserve.models.internvl import prompt

        return prompt.load_language_model(model_dir, dtype, device)

    def encode(self, tower, pixels, items: list[MediaItem]) -> list[EncodedItem]:
        """Projected features, tokens_per_tile rows per tile, of each item."""
        from mmserve.models.internvl import vision

        return vision.encode(tower, pixels, items)

    def positions(self, ids: list[int], items: list[MediaItem]):
        """1-D positions ([1, N]) and a rope delta of 0."""
        from mmserve.models.internvl import prompt

        return prompt.positions(ids)

    def language_model_inputs(self, embed_tokens, ids, encoded, items) -> dict:
        """inputs_embeds with the item rows at the pads, and position_ids [1, N]."""
        from mmserve.models.internvl import prompt

        return prompt.language_model_inputs(self, embed_tokens, ids, encoded)


def from_pretrained(model_dir: str | pathlib.Path) -> InternVL:
    """The InternVL family set up from a checkpoint directory."""
    return InternVL(load_settings(model_dir))
