"""The Qwen2.5-VL image processor in numpy/PIL.

An image becomes `(num_patches, 1176)` float32 patches plus its `grid_thw = (1, h, w)` (in 14-px patches):
convert to RGB (transparency composited onto white), resize with PIL bicubic so that both sides are multiples of 28
and the pixel count lies in [min_pixels, max_pixels] (`smart_resize`), scale to [0, 1], normalise with the CLIP
mean/std, and cut into 2x2 groups of 14x14 patches (merge-block order), each patch repeated over the 2 temporal
slots. Equal to transformers' `Qwen2VLImageProcessorPil` on 8-bit images; 16-bit, int32 and float images are first
scaled to 8 bits (`to_8bit`) where transformers clips them.
"""
from __future__ import annotations

import io
import json
import math
import os

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The Qwen2.5-VL image processor's own min/max pixels (a checkpoint without preprocessor_config.json).
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280
# The Visual-ARFT scripts' max_pixels: what varft's recipes (varft.defaults) train and evaluate at.
PAPER_MAX_PIXELS = 512 * 28 * 28
MAX_ASPECT_RATIO = 200

ImageSource = str | os.PathLike | bytes | Image.Image


class ImageError(ValueError):
  """An image that cannot be read or processed; the message names the image."""


def _describe(source) -> str:
  if isinstance(source, (str, os.PathLike)):
    return f"image file {os.fspath(source)!r}"
  if isinstance(source, (bytes, bytearray)):
    return f"image bytes ({len(source)} bytes)"
  return "image"


def to_8bit(image: Image.Image) -> Image.Image:
  """An 8-bit 'L' copy of a high-bit-depth one-band image (16-bit 'I;16*', 32-bit int 'I', float 'F'); any other
  image as it is.

  PIL's `convert` clips these to 0..255 (a 16-bit PNG turns white, a float image in [0, 1] black). Here 16-bit data
  (the I;16 modes, and 'I' from a PNG) maps 0..65535 to 0..255, as PIL does for 48-bit RGB; float data in [0, 1]
  maps to 0..255; 'I' or 'F' data already in 0..255 is kept; anything else (negative or larger values, whose
  nominal range is unknown) is stretched from its min..max to 0..255. Non-finite values become 0.
  """
  mode = image.mode
  if not (mode.startswith("I") or mode == "F"):
    return image
  values = np.asarray(image, np.float32)  # float32 is exact enough for an 8-bit result
  finite = np.isfinite(values)
  low, high = (float(values[finite].min()), float(values[finite].max())) if finite.any() else (0.0, 0.0)
  if mode.startswith("I;16") or (mode == "I" and image.format == "PNG"):
    scaled = values * (255 / 65535)
  elif mode == "F" and low >= 0 and high <= 1:
    scaled = values * 255
  elif low >= 0 and high <= 255:
    scaled = values
  else:
    scaled = (values - low) * (255 / (high - low)) if high > low else np.zeros_like(values)
  scaled = np.where(finite, np.clip(np.round(scaled), 0, 255), 0)
  return Image.fromarray(scaled.astype(np.uint8), "L")


def to_rgb(image: Image.Image) -> Image.Image:
  """RGB copy of `image`; high-bit-depth data scaled to 8 bits (`to_8bit`); any transparency (alpha band or palette
  transparency) composited onto white."""
  image = to_8bit(image)
  if "A" in image.getbands() or image.info.get("transparency") is not None:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
  return image.convert("RGB")


def load_image(source: ImageSource) -> Image.Image:
  """Decodes a path, raw bytes or a PIL image into a fully loaded RGB PIL image.

  Raises FileNotFoundError for a missing file and ImageError (naming the file) for anything PIL cannot decode,
  including truncated files.
  """
  if isinstance(source, Image.Image):
    return to_rgb(source)
  what = _describe(source)
  if isinstance(source, (str, os.PathLike)) and not os.path.isfile(source):
    raise FileNotFoundError(f"Missing {what}: no such file.")
  try:
    stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    with Image.open(stream) as image:
      image.load()  # decode everything now so that truncated files fail here, not later
      return to_rgb(image)
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ImageError(f"Cannot decode {what}: {e}. Is it a valid PNG/JPEG/... file?") from e


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = DEFAULT_MIN_PIXELS,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
  """The resized (height, width): multiples of `factor`, pixel count within [min_pixels, max_pixels], aspect ratio
  kept as closely as possible. Aspect ratios above 200 are rejected (as Qwen2.5-VL does)."""
  if height < 1 or width < 1:
    raise ImageError(f"Image has an empty side: {height}x{width} pixels.")
  ratio = max(height, width) / min(height, width)
  if ratio > MAX_ASPECT_RATIO:
    raise ImageError(f"Image of {width}x{height} pixels has aspect ratio {ratio:.1f} > {MAX_ASPECT_RATIO}; "
                     "crop or pad it first.")
  h_bar = round(height / factor) * factor
  w_bar = round(width / factor) * factor
  if h_bar * w_bar > max_pixels:
    beta = math.sqrt((height * width) / max_pixels)
    h_bar = max(factor, math.floor(height / beta / factor) * factor)
    w_bar = max(factor, math.floor(width / beta / factor) * factor)
  elif h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h_bar = math.ceil(height * beta / factor) * factor
    w_bar = math.ceil(width * beta / factor) * factor
  return h_bar, w_bar


# qwen-vl-utils' `fetch_image` (the released eval scripts' `process_vision_info`) limits before the processor runs.
VISION_INFO_MIN_PIXELS = 4 * 28 * 28
VISION_INFO_MAX_PIXELS = 16384 * 28 * 28


def vision_info_resize(image: Image.Image) -> Image.Image:
  """The first of the released eval scripts' two resizes: qwen-vl-utils fits every image to multiples of 28 within
  its own pixel limits (PIL bicubic) before the processor's `smart_resize` (aspect ratio kept by both)."""
  width, height = image.size
  new_h, new_w = smart_resize(height, width, 28, VISION_INFO_MIN_PIXELS, VISION_INFO_MAX_PIXELS)
  return image if (new_w, new_h) == image.size else image.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)


def patchify(pixels: np.ndarray, patch_size: int = 14, merge_size: int = 2,
             temporal_patch_size: int = 2) -> tuple[np.ndarray, np.ndarray]:
  """(H, W, C) float image -> patches `(h*w, C*T*p*p)` in merge-block order, and grid_thw `(1, h, w)`."""
  height, width, channels = pixels.shape
  gh, gw = height // patch_size, width // patch_size
  chw = np.transpose(pixels, (2, 0, 1))
  blocks = chw.reshape(channels, gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size, patch_size)
  blocks = np.transpose(blocks, (1, 4, 2, 5, 0, 3, 6))  # (gh/m, gw/m, m, m, C, p, p)
  blocks = np.broadcast_to(blocks[:, :, :, :, :, None], blocks.shape[:5] + (temporal_patch_size,) + blocks.shape[5:])
  patches = np.ascontiguousarray(blocks.reshape(gh * gw, channels * temporal_patch_size * patch_size ** 2))
  return patches, np.array([1, gh, gw], np.int64)


def process_image(image: ImageSource, min_pixels: int = DEFAULT_MIN_PIXELS, max_pixels: int = DEFAULT_MAX_PIXELS,
                  patch_size: int = 14, merge_size: int = 2,
                  temporal_patch_size: int = 2) -> tuple[np.ndarray, np.ndarray]:
  """An image (path, bytes or PIL) -> `(patches (n, 1176) float32, grid_thw (3,) int64)`."""
  rgb = load_image(image)
  width, height = rgb.size
  try:
    new_h, new_w = smart_resize(height, width, patch_size * merge_size, min_pixels, max_pixels)
  except ImageError as e:
    raise ImageError(f"Cannot process {_describe(image)}: {e}") from None
  resized = rgb.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
  pixels = (np.asarray(resized, np.float64) * (1 / 255)).astype(np.float32)
  pixels = (pixels - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
  return patchify(pixels, patch_size, merge_size, temporal_patch_size)


def processor_settings(hf_dir: str | None = None) -> dict[str, int]:
  """min/max pixels and patch sizes from an HF folder's `preprocessor_config.json` (defaults without one)."""
  settings = dict(min_pixels=DEFAULT_MIN_PIXELS, max_pixels=DEFAULT_MAX_PIXELS, patch_size=14, merge_size=2,
                  temporal_patch_size=2)
  path = os.path.join(hf_dir, "preprocessor_config.json") if hf_dir else None
  if not path or not os.path.exists(path):
    return settings
  with open(path) as f:
    raw = json.load(f)
  size = raw.get("size") or {}
  settings["min_pixels"] = int(raw.get("min_pixels", size.get("shortest_edge", settings["min_pixels"])))
  settings["max_pixels"] = int(raw.get("max_pixels", size.get("longest_edge", settings["max_pixels"])))
  for key in ("patch_size", "merge_size", "temporal_patch_size"):
    settings[key] = int(raw.get(key, settings[key]))
  return settings


def square_resizer(size: int):
  """An example transform resizing every image to size x size (the paper's 720 x 720), or None for size 0."""
  if not size:
    return None

  def resize(example: dict) -> dict:
    images = []
    for data in example.get("images") or ():
      try:
        image = Image.open(io.BytesIO(data)).convert("RGB").resize((size, size), Image.BICUBIC)
      except (OSError, ValueError):
        images.append(data)  # left for the rollout, which skips and counts unreadable images
        continue
      buffer = io.BytesIO()
      image.save(buffer, format="PNG")
      images.append(buffer.getvalue())
    return {**example, "images": images}

  return resize
