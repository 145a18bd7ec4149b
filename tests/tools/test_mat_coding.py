"""Real MAT-Coding items (downscaled copies of the degraded images): programs in the paper's format fix each one
inside the sandbox, and the returned pixels are the right ones."""
import json
import os

import numpy as np
from PIL import Image
import pytest

from varft.tools import code as code_lib

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "mat_coding")

ROTATE_180 = """<think>The label is upside down; rotate it back.</think>
<code>```python
import cv2
image = cv2.imread('path_to_input_image.jpg')
cv2.imwrite('path_to_output_image.jpg', cv2.rotate(image, cv2.ROTATE_180))
```</code>"""

BRIGHTEN = """<code>```python
import cv2
import numpy as np
image = cv2.imread('path_to_input_image.jpg')
table = (255.0 * (np.arange(256) / 255.0) ** 0.5).astype(np.uint8)  # gamma 0.5 lifts the shadows
cv2.imwrite('path_to_output_image.jpg', cv2.LUT(image, table))
```</code>"""

ROTATE_CCW_AND_BRIGHTEN = """<code>```python
import cv2
import numpy as np
image = cv2.imread('path_to_input_image.jpg')
image = cv2.rotate(image, cv2.ROTATE_90_COUNTERCLOCKWISE)
table = (255.0 * (np.arange(256) / 255.0) ** 0.5).astype(np.uint8)
cv2.imwrite('path_to_output_image.jpg', cv2.LUT(image, table))
```</code>"""

CROP = """<code>```python
from PIL import Image
image = Image.open('path_to_input_image.jpg')
x1, y1, x2, y2 = [366, 723, 506, 851]
w, h = image.size
box = (x1 * w // 1000, y1 * h // 1000, x2 * w // 1000, y2 * h // 1000)
image.crop(box).save('path_to_output_image.jpg', format='PNG')
```</code>"""


@pytest.fixture(scope="module")
def sandbox():
  return code_lib.CodeSandbox(dict(timeout_s=60, max_concurrency=2))


def _case(case_id):
  with open(os.path.join(FIXTURES, "coding_case.json")) as f:
    case = {c["id"]: c for c in json.load(f)}[case_id]
  name = case["ori_image_path"] if case["type"] == ["crop"] else case["processed_image_path"]
  return case, Image.open(os.path.join(FIXTURES, name)).convert("RGB")


def _gray(a):
  return np.asarray(a, np.float32).mean(-1)


def _corr(a, b):
  a, b = _gray(a).ravel(), _gray(b).ravel()
  return float(np.corrcoef(a, b)[0, 1])


def _run(sandbox, program, image):
  r = sandbox.run(program, {"path_to_input_image.jpg": image})
  assert r.ok, (r.error, r.stderr)
  return np.asarray(r.output_image)


def test_rotation180_is_rotated_back(sandbox):
  case, image = _case(12)
  assert case["type"] == ["rotation180"]
  out = _run(sandbox, ROTATE_180, image)
  src = np.asarray(image)
  assert out.shape == src.shape
  assert np.abs(out.astype(int) - np.rot90(src, 2)).mean() < 3  # JPEG round trip only.
  assert np.abs(out.astype(int) - src).mean() > 20  # And it is not the unrotated image.


def test_dark_invoice_is_brightened(sandbox):
  case, image = _case(22)
  assert case["type"] == ["dark"]
  out = _run(sandbox, BRIGHTEN, image)
  src = np.asarray(image)
  assert out.shape == src.shape
  assert _gray(out).mean() > _gray(src).mean() + 30
  assert _corr(out, src) > 0.9  # Same content, only the tone curve changed.


def test_rotation90_dark_is_upright_and_bright(sandbox):
  case, image = _case(71)
  assert case["type"] == ["rotation90", "dark"]
  out = _run(sandbox, ROTATE_CCW_AND_BRIGHTEN, image)
  src = np.asarray(image)
  assert out.shape == (src.shape[1], src.shape[0], 3)
  assert _corr(out, np.rot90(src, 1)) > 0.9
  assert _corr(out, np.rot90(src, -1)) < 0.5  # The other direction would leave the text upside down.
  assert _gray(out).mean() > _gray(src).mean() + 30


def test_crop_returns_the_question_region(sandbox):
  case, image = _case(119)
  assert case["type"] == ["crop"] and "[366, 723, 506, 851]" in case["question"]
  out = _run(sandbox, CROP, image)
  w, h = image.size
  x1, y1, x2, y2 = 366 * w // 1000, 723 * h // 1000, 506 * w // 1000, 851 * h // 1000
  expected = np.asarray(image)[y1:y2, x1:x2]
  assert out.shape == expected.shape
  np.testing.assert_array_equal(out, expected)  # Written as PNG: lossless.
  shifted = np.asarray(image)[y1 + 20:y2 + 20, x1 + 20:x2 + 20]
  assert np.abs(out.astype(int) - shifted).mean() > 10  # A box off by 20 px would not pass.
