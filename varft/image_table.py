"""The images of one rollout: each distinct image processed once (keyed by its pixels), and the per-device image
tables an extend or prefill encodes (each sampler device encodes only the images its own rows show)."""
from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import hashlib

import numpy as np
from PIL import Image

from varft import batch as batch_lib
from varft import sampling
from varft.processing import image as image_lib


@dataclasses.dataclass
class ImageEntry:
  key: str
  pil: Image.Image
  patches: np.ndarray
  grid: np.ndarray
  num_tokens: int


class ImageTable:
  """Images by key (a hash of their pixels), processed as `RolloutConfig` says (pixel limits, qwen-vl-utils'
  prefit); `encoded` counts (device, image) pairs sent to the vision tower."""

  def __init__(self, min_pixels: int, max_pixels: int, prefit: bool, vision_cfg, patch_buckets: Sequence[int]):
    self.min_pixels, self.max_pixels, self.prefit = min_pixels, max_pixels, prefit
    self.vision_cfg = vision_cfg
    self.patch_buckets = patch_buckets
    self.merge = vision_cfg.spatial_merge_size
    self.max_image_patches = max_pixels // vision_cfg.patch_size ** 2
    self.entries: dict[str, ImageEntry] = {}
    self.encoded = 0

  def __getitem__(self, key: str) -> ImageEntry:
    return self.entries[key]

  def add(self, source) -> str:
    """Loads and processes an image (bytes, path, array or PIL) unless it is already here; returns its key."""
    pil = image_lib.load_image(source)
    key = hashlib.sha1(pil.tobytes() + repr(pil.size).encode()).hexdigest()
    if key not in self.entries:
      shown = image_lib.vision_info_resize(pil) if self.prefit else pil
      patches, grid = image_lib.process_image(shown, self.min_pixels, self.max_pixels)
      tokens = int(np.prod(grid)) // self.merge ** 2
      self.entries[key] = ImageEntry(key, pil, patches, np.asarray(grid, np.int64), tokens)
    return key

  def batch_images(self) -> dict[str, batch_lib.Image]:
    return {k: batch_lib.Image(e.patches, e.grid) for k, e in self.entries.items()}

  def device_tables(self, rows: Sequence[batch_lib.Row], num_shards: int):
    """((pixel_values, vision_inputs) of each sampler device's table of the images `rows` show, the rows'
    `image_index` into their own device's table)."""
    per_device, index = batch_lib.device_images(rows, self.batch_images(), num_shards, self.vision_cfg)
    self.encoded += sum(len(t) for t in per_device)
    patches = sampling.bucket(batch_lib.table_patches(per_device, self.vision_cfg), self.patch_buckets,
                              beyond="multiple")
    tables = batch_lib.image_tables(per_device, self.vision_cfg, patches,
                                    batch_lib.key_blocks(patches, self.max_image_patches, self.vision_cfg))
    return (tables["pixel_values"], tables["vision_inputs"]), index
