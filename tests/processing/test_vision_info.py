"""The released scripts' first image resize (qwen-vl-utils' fetch_image) before the processor."""
from PIL import Image

from varft.processing import image as image_lib


def test_vision_info_resize_fits_multiples_of_28_and_keeps_the_aspect_ratio():
  assert image_lib.vision_info_resize(Image.new("RGB", (1000, 750))).size == (1008, 756)
  assert image_lib.vision_info_resize(Image.new("RGB", (20, 20))).size == (56, 56)  # 4 x 28 x 28 at least
  aligned = Image.new("RGB", (280, 140))
  assert image_lib.vision_info_resize(aligned) is aligned
  # Then the processor: 1008 x 756 -> 728 x 532 under 401408 pixels, the aspect ratio kept (not 720 x 720).
  _, grid = image_lib.process_image(image_lib.vision_info_resize(Image.new("RGB", (1000, 750))), 3136, 401408)
  assert list(grid) == [1, 532 // 14, 728 // 14]
