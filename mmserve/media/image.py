"""Image decoding with Pillow, matching HF Qwen2VLImageProcessorPil's RGB conversion and resize."""

from __future__ import annotations

import io
from typing import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from mmserve.media.errors import MediaError
from mmserve.media.sizing import IMAGE_FACTOR, MAX_PIXELS, MIN_PIXELS, smart_resize

_FORMATS = ("JPEG", "PNG", "WEBP", "GIF")
# Largest decoded input accepted (about 67 MP); checked from the header, before any pixel is decoded.
MAX_INPUT_PIXELS = 8192 * 8192
MAX_INPUT_SIDE = 32768


def _sniff(data: bytes) -> str | None:
    """The format a file's magic bytes announce, if one we accept."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "WebP"
    return None


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB conversion of transformers' convert_to_rgb: transparency is composited onto white."""
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def resized_rgb(image: Image.Image, height: int, width: int) -> np.ndarray:
    """uint8 [1,H,W,3] of an image converted to RGB and resized with PIL bicubic, as transformers' PIL processors do
    (no reducing_gap; an image already of the size is copied)."""
    rgb = _to_rgb(image)
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), resample=Image.Resampling.BICUBIC)
    return np.array(rgb, dtype=np.uint8)[None]


def decode_image(
    data: bytes,
    *,
    min_pixels: float = MIN_PIXELS,
    max_pixels: float = MAX_PIXELS,
    factor: int = IMAGE_FACTOR,
    max_input_pixels: int = MAX_INPUT_PIXELS,
) -> np.ndarray:
    """Decode a JPEG/PNG/WebP/GIF (first frame) to uint8 [1,H,W,3], resized to smart_resize(h, w)."""

    def resize(img: Image.Image) -> np.ndarray:
        return resized_rgb(img, *smart_resize(img.height, img.width, factor, min_pixels, max_pixels))

    return decode_image_with(data, resize, max_input_pixels=max_input_pixels)


def decode_image_with(data: bytes, frames_of: Callable[[Image.Image], np.ndarray], *,
                      max_input_pixels: int = MAX_INPUT_PIXELS) -> np.ndarray:
    """frames_of(image) for a JPEG/PNG/WebP/GIF (first frame) whose header is within the limits; bad or truncated
    data is a MediaError."""
    if not data:
        raise MediaError("image: empty data")
    try:
        img = Image.open(io.BytesIO(data), formats=_FORMATS)
    except UnidentifiedImageError:
        if (fmt := _sniff(data)) is not None:
            raise MediaError(f"image: corrupt or unsupported {fmt} header") from None
        raise MediaError("image: not a JPEG, PNG, WebP or GIF file") from None
    except Image.DecompressionBombError as e:  # far beyond our own limit, refused by Pillow from the header
        raise MediaError(f"image: dimensions too large, over the limit of {max_input_pixels} pixels ({e})") from None
    except Exception as e:  # Pillow raises assorted errors on malformed headers.
        raise MediaError(f"image: unreadable {type(e).__name__}: {e}") from None
    with img:
        width, height = img.size
        if width <= 0 or height <= 0:
            raise MediaError(f"image: invalid dimensions {width}x{height}")
        if width * height > max_input_pixels:
            raise MediaError(
                f"image: {width}x{height} is {width * height} pixels, over the limit of {max_input_pixels}"
            )
        if max(width, height) > MAX_INPUT_SIDE:
            raise MediaError(f"image: {width}x{height} has a side over the limit of {MAX_INPUT_SIDE} pixels")
        fmt = img.format
        try:
            return frames_of(img)
        except OSError as e:
            raise MediaError(f"image: truncated or corrupt {fmt} data ({e})") from None
        except ValueError as e:  # a MediaError, or the family's resize rule refusing the size
            raise MediaError(str(e)) from None
        except Exception as e:
            raise MediaError(f"image: cannot decode {fmt} data ({type(e).__name__}: {e})") from None
