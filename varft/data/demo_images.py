"""The embedded demo's images: company logos, shipping labels and word grids, the MAT-Coding degradations, and the
reference OpenCV program that undoes each (what the demo's code steps write)."""
from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

IMAGE_SIZE = 224


def _font(size: int) -> ImageFont.ImageFont:
  try:
    return ImageFont.load_default(size=size)
  except (TypeError, OSError):  # Pillow without FreeType: fixed bitmap font.
    return ImageFont.load_default()


def _centered_text(draw: ImageDraw.ImageDraw, box, text: str, size: int, fill) -> None:
  font = _font(size)
  left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
  x = (box[0] + box[2] - (right - left)) / 2 - left
  y = (box[1] + box[3] - (bottom - top)) / 2 - top
  draw.text((x, y), text, font=font, fill=fill)


def logo_image(e: dict) -> Image.Image:
  """A company logo: a coloured shape and the company name."""
  image = Image.new('RGB', (IMAGE_SIZE, IMAGE_SIZE), (245, 243, 235))
  draw = ImageDraw.Draw(image)
  c, r = IMAGE_SIZE // 2, IMAGE_SIZE // 4
  box = (c - r, c - r - 30, c + r, c + r - 30)
  if e['shape'] == 'circle':
    draw.ellipse(box, fill=e['color'])
  elif e['shape'] == 'square':
    draw.rectangle(box, fill=e['color'])
  else:
    draw.polygon([(c, box[1]), (box[2], box[3]), (box[0], box[3])], fill=e['color'])
  _centered_text(draw, (0, 150, IMAGE_SIZE, 190), e['company'], 22, (20, 20, 20))
  return image


def code_word(rng: np.random.Generator) -> str:
  letters = ''.join(rng.choice(list('ABCDEFGHJKLMNPRSTUVWXYZ'), size=3))
  return f'{letters}-{int(rng.integers(100, 1000))}'


def label_image(word: str, rng: np.random.Generator) -> Image.Image:
  """A label with one code word on a textured background (asymmetric, so rotations show)."""
  image = Image.new('RGB', (IMAGE_SIZE, IMAGE_SIZE), tuple(int(v) for v in rng.integers(150, 230, 3)))
  draw = ImageDraw.Draw(image)
  draw.rectangle((0, 0, IMAGE_SIZE, 36), fill=(40, 40, 60))
  _centered_text(draw, (0, 0, IMAGE_SIZE, 36), 'SHIPPING LABEL', 16, (240, 240, 240))
  draw.rectangle((16, 80, IMAGE_SIZE - 16, 150), fill=(255, 255, 255), outline=(0, 0, 0), width=2)
  _centered_text(draw, (16, 80, IMAGE_SIZE - 16, 150), word, 30, (0, 0, 0))
  return image


def grid_image(words: list[str]) -> Image.Image:
  """A 3x3 grid of words for `crop` questions."""
  image = Image.new('RGB', (IMAGE_SIZE, IMAGE_SIZE), (250, 250, 250))
  draw = ImageDraw.Draw(image)
  cell = IMAGE_SIZE // 3
  for k, word in enumerate(words):
    x, y = (k % 3) * cell, (k // 3) * cell
    draw.rectangle((x + 2, y + 2, x + cell - 2, y + cell - 2), outline=(120, 120, 120))
    _centered_text(draw, (x, y, x + cell, y + cell), word, 11, (10, 10, 10))
  return image


def grid_box(k: int) -> tuple[int, int, int, int]:
  """Cell k of the 3x3 grid in the 0-1000 normalized coordinates MAT-Coding uses."""
  cell = IMAGE_SIZE // 3
  x, y = (k % 3) * cell, (k // 3) * cell
  return tuple(int(round(v * 1000 / IMAGE_SIZE)) for v in (x, y, x + cell, y + cell))


def degrade(image: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
  """Applies one MAT-Coding degradation (`crop` and `none` leave the image as it is)."""
  if kind == 'rotation90':
    return image.transpose(Image.Transpose.ROTATE_90)
  if kind == 'rotation180':
    return image.transpose(Image.Transpose.ROTATE_180)
  if kind in ('crop', 'none'):
    return image
  if kind == 'blur':
    return image.filter(ImageFilter.GaussianBlur(radius=2.0))
  x = np.asarray(image, dtype=np.float32)
  if kind == 'dark':
    x = x * 0.25
  elif kind == 'overexposure':
    x = 180.0 + x * 0.3
  elif kind == 'noise':
    x = x + rng.normal(0.0, 40.0, size=x.shape)
  else:
    raise ValueError(f'unknown degradation {kind!r}')
  return Image.fromarray(np.clip(np.round(x), 0, 255).astype(np.uint8))


# The reference fix for each degradation, as the paper's code step writes it (OpenCV, reading
# 'path_to_input_image.jpg' and writing 'path_to_output_image.jpg'). Short: every code step stays under 128 tokens,
# the demo's turn budget (its update computes vocabulary logits for that many positions per row).
FIXES = {
    'rotation90': 'image = cv2.rotate(image, cv2.ROTATE_90_CLOCKWISE)',
    'rotation180': 'image = cv2.rotate(image, cv2.ROTATE_180)',
    'dark': 'image = cv2.convertScaleAbs(image, alpha=4.0, beta=0)',
    'overexposure': 'image = cv2.convertScaleAbs(image, alpha=3.3, beta=-594)',
    'blur': 'image = cv2.addWeighted(image, 2, cv2.GaussianBlur(image, (0, 0), 2), -1, 0)',  # unsharp mask
    'noise': 'image = cv2.fastNlMeansDenoisingColored(image, None, 15, 15, 7, 21)',
}


def fix_code(kinds: list[str], box: tuple[int, int, int, int] | None = None) -> str:
  """The OpenCV program that undoes `kinds` (rotation first) or crops the normalized `box`."""
  lines = ['import cv2', "image = cv2.imread('path_to_input_image.jpg')"]
  if 'crop' in kinds:
    x1, y1, x2, y2 = box
    lines += [
        'h, w = image.shape[:2]', f'image = image[{y1} * h // 1000:{y2} * h // 1000, {x1} * w // 1000:{x2} * w // 1000]'
    ]
  for kind in sorted(kinds, key=lambda k: not k.startswith('rotation')):
    if kind in FIXES:
      lines.append(FIXES[kind])
  lines.append("cv2.imwrite('path_to_output_image.jpg', image)")
  return '\n'.join(lines)


def save_png(image: Image.Image, path: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  buf = io.BytesIO()
  image.save(buf, format='PNG')
  with open(path, 'wb') as f:
    f.write(buf.getvalue())
