"""The sandbox as a normal (non-root) user, with bubblewrap and with the unshare fallback: CI runs as root, so
the test creates the user and runs a small script as that user (see nonroot.py)."""
import json
import os
import shutil
import sys

import pytest

from tests.tools import nonroot

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = """
import json, os, sys
import numpy as np
from PIL import Image
from varft.tools import code
a = np.zeros((10, 16, 3), np.uint8)
a[:, :8] = 255
program = ("import cv2\\nimg = cv2.imread('path_to_input_image.jpg')\\n"
           "cv2.imwrite('path_to_output_image.jpg', cv2.flip(img, 1))\\n")
out = {"uid": os.getuid()}
for isolation in sys.argv[1:]:
  sb = code.CodeSandbox({"isolation": isolation, "prewarm": True, "max_concurrency": 1})
  r = sb.run(program, Image.fromarray(a))
  image = np.asarray(r.output_image) if r.output_image else None
  out[isolation] = {"isolation": sb.isolation, "ok": r.ok, "error": r.error, "stderr": r.stderr[-300:],
                    "cgroups": sb.cgroups is not None,
                    "right_white": bool(image is not None and image[:, 8:].mean() > 240)}
  sb.close()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def as_user():
  why = nonroot.missing_tools()
  if why:
    pytest.skip(why)

  def run(*isolations):
    proc = nonroot.run([sys.executable, "-c", SCRIPT, *isolations], env={**os.environ, "PYTHONPATH": REPO}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])

  return run


@pytest.mark.parametrize("isolation", [
    pytest.param(name, marks=pytest.mark.skipif(not shutil.which(name), reason=f"{name} not installed"))
    for name in ("bwrap", "unshare")
])
def test_sandbox_runs_programs_as_a_normal_user(as_user, isolation):
  out = as_user(isolation)
  assert out["uid"] != 0
  got = out[isolation]
  assert got["isolation"] == isolation and got["ok"], got
  assert got["right_white"] and not got["cgroups"]  # rlimit-only mode, and the image came back flipped.
