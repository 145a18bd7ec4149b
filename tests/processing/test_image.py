import io
import os

import numpy as np
from PIL import Image
import pytest

from varft.processing import image as image_lib

pil_processor_module = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")

MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 256


def _random_image(width, height, mode="RGB", seed=0):
  rng = np.random.default_rng(seed)
  if mode == "L":
    return Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), "L")
  if mode == "RGBA":
    return Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
  rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
  if mode == "P":
    return rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
  if mode == "P_transparent":
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 3
    return palette
  return rgb


def _hf(image, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS):
  processor = pil_processor_module.Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
  out = processor(images=[image], return_tensors="np")
  return out["pixel_values"], out["image_grid_thw"][0]


@pytest.mark.parametrize(
    "width,height,mode",
    [
        (57, 83, "RGB"),
        (1, 1, "RGB"),
        (333, 45, "RGB"),
        (1000, 700, "RGB"),  # odd, tiny, wide, resized down
        (90, 61, "L"),
        (64, 100, "RGBA"),
        (77, 50, "P"),
        (50, 77, "P_transparent"),
    ])
def test_matches_transformers_pil_processor(width, height, mode):
  image = _random_image(width, height, mode)
  patches, grid = image_lib.process_image(image, MIN_PIXELS, MAX_PIXELS)
  want_patches, want_grid = _hf(image)
  np.testing.assert_array_equal(grid, want_grid)
  assert patches.dtype == np.float32 and patches.shape == (grid.prod(), 1176)
  assert np.abs(patches - want_patches).max() <= 1e-5


def test_huge_wide_image_is_processed_within_max_pixels(tmp_path):
  path = tmp_path / "panorama.png"
  _random_image(50_000, 300).save(path)
  patches, grid = image_lib.process_image(str(path), MIN_PIXELS, MAX_PIXELS)
  assert grid[1] * grid[2] * 14 * 14 <= MAX_PIXELS
  assert grid[2] > 20 * grid[1]  # the aspect ratio survives
  want_patches, want_grid = _hf(Image.open(path))
  np.testing.assert_array_equal(grid, want_grid)
  assert np.abs(patches - want_patches).max() <= 1e-5


def test_extreme_aspect_ratio_is_rejected_naming_the_file(tmp_path):
  path = tmp_path / "strip.png"
  _random_image(50_000, 100).save(path)
  with pytest.raises(image_lib.ImageError, match=r"strip\.png.*aspect ratio"):
    image_lib.process_image(str(path))


def test_one_pixel_image_is_upscaled_to_min_pixels(tmp_path):
  path = tmp_path / "dot.png"
  Image.new("RGB", (1, 1), (255, 0, 0)).save(path)
  patches, grid = image_lib.process_image(str(path), MIN_PIXELS, MAX_PIXELS)
  np.testing.assert_array_equal(grid, [1, 4, 4])
  red = (1.0 - image_lib.CLIP_MEAN[0]) / image_lib.CLIP_STD[0]
  np.testing.assert_allclose(patches.reshape(16, 3, -1)[:, 0], red, atol=1e-5)


def test_missing_file_names_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere.jpg"):
    image_lib.load_image(str(tmp_path / "nowhere.jpg"))


def test_corrupt_file_names_the_file(tmp_path):
  path = tmp_path / "noise.jpg"
  path.write_bytes(os.urandom(2000))
  with pytest.raises(image_lib.ImageError, match="noise.jpg"):
    image_lib.load_image(str(path))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_names_the_file(tmp_path, fmt):
  buffer = io.BytesIO()
  _random_image(200, 150).save(buffer, format=fmt)
  path = tmp_path / f"cut.{fmt.lower()}"
  path.write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])
  with pytest.raises(image_lib.ImageError, match=f"cut.{fmt.lower()}"):
    image_lib.load_image(str(path))


def test_bytes_and_transparency_on_white():
  buffer = io.BytesIO()
  Image.new("RGBA", (10, 10), (0, 0, 0, 0)).save(buffer, format="PNG")
  rgb = image_lib.load_image(buffer.getvalue())
  assert rgb.mode == "RGB" and rgb.getpixel((3, 3)) == (255, 255, 255)


def test_smart_resize_matches_transformers():
  rng = np.random.default_rng(1)
  for height, width in rng.integers(1, 3000, (300, 2)):
    if max(height, width) / min(height, width) > 200:
      continue
    for lo, hi in [(MIN_PIXELS, MAX_PIXELS), (3136, 12845056)]:
      assert image_lib.smart_resize(int(height), int(width), 28, lo, hi) == \
          pil_processor_module.smart_resize(int(height), int(width), 28, lo, hi)


def test_processor_settings_read_both_layouts(tmp_path):
  (tmp_path / "preprocessor_config.json").write_text('{"size": {"shortest_edge": 100, "longest_edge": 5000}}')
  assert image_lib.processor_settings(str(tmp_path))["max_pixels"] == 5000
  (tmp_path / "preprocessor_config.json").write_text('{"min_pixels": 3136, "max_pixels": 12845056}')
  settings = image_lib.processor_settings(str(tmp_path))
  assert (settings["min_pixels"], settings["max_pixels"]) == (3136, 12845056)
  assert image_lib.processor_settings(None)["max_pixels"] == image_lib.DEFAULT_MAX_PIXELS


def _gradient(dtype, low, high, shape=(16, 64)):
  return np.linspace(low, high, shape[0] * shape[1]).reshape(shape).astype(dtype)


def _decoded(array, fmt):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format=fmt)
  return image_lib.load_image(buffer.getvalue())


def test_16_bit_png_is_scaled_to_8_bits_not_clipped():
  values = _gradient(np.uint16, 0, 65535)
  rgb = _decoded(values, "PNG")
  assert rgb.mode == "RGB"
  got = np.asarray(rgb)[..., 0].astype(int)
  np.testing.assert_array_equal(got, np.round(values / 257).astype(int))  # as PIL maps 48-bit RGB
  assert got.min() == 0 and got.max() == 255 and len(np.unique(got)) == 256
  eight_bit = Image.fromarray(np.round(values / 257).astype(np.uint8)).convert("RGB")
  np.testing.assert_array_equal(image_lib.process_image(rgb)[0], image_lib.process_image(eight_bit)[0])


@pytest.mark.parametrize(
    "values, expected",
    [
        (_gradient(np.float32, 0, 1), lambda v: v * 255),  # normalised floats
        (_gradient(np.float32, -2, 6), lambda v: (v + 2) * 255 / 8),  # no nominal range: min..max stretched
        (_gradient(np.float32, 0, 255), lambda v: v),  # 8-bit data stored as float
        (_gradient(np.int32, 0, 1_000_000), lambda v: v * 255 / 1_000_000),
        (_gradient(np.int32, -500, 500), lambda v: (v + 500) * 255 / 1000),
        (_gradient(np.int32, 0, 255), lambda v: v),
    ])
def test_float_and_int32_tiff_are_scaled_to_8_bits_not_clipped(values, expected):
  got = np.asarray(_decoded(values, "TIFF"))
  assert got.shape == values.shape + (3,) and (got[..., 0] == got[..., 2]).all()
  np.testing.assert_allclose(got[..., 0], np.round(expected(values.astype(np.float64))), atol=1)
  assert got.max() - got.min() >= 250  # the full range is used, nothing collapsed to black or white


@pytest.mark.parametrize("high", [1, 1000])
def test_non_finite_float_pixels_become_black(high):
  values = _gradient(np.float32, high / 2, high)
  values[0, :4] = [np.nan, np.inf, -np.inf, np.nan]
  got = np.asarray(image_lib.to_8bit(Image.fromarray(values)))
  assert (got[0, :4] == 0).all() and got.max() == 255


def test_eight_bit_images_are_left_as_they_are():
  for mode in ("L", "RGB", "RGBA"):
    image = _random_image(9, 7, mode)
    assert image_lib.to_8bit(image) is image


def test_square_resizer_resizes_and_keeps_unreadable_images():
  buffer = io.BytesIO()
  Image.new("RGB", (40, 20), (255, 0, 0)).save(buffer, format="PNG")
  out = image_lib.square_resizer(32)({"id": "a", "images": [buffer.getvalue(), b"not an image"]})
  assert Image.open(io.BytesIO(out["images"][0])).size == (32, 32)
  assert out["images"][1] == b"not an image" and out["id"] == "a"
  assert image_lib.square_resizer(0) is None
