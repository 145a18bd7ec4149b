"""The sandbox under every Python layout: a `python3 -m venv` venv, symlink chains of any depth (through symlinked
folders), a pyenv-style base prefix, the system interpreter, a conda-style self-contained prefix; with bubblewrap
and with the unshare fallback. A layout the sandbox cannot start fails when the sandbox is built."""
import logging
import os
import re
import shutil
import subprocess
import sys

import cv2
import numpy as np
from PIL import Image
import pytest

from varft.tools import code as code_lib
from varft.tools import sandbox_launch

ISOLATIONS = [
    pytest.param(name, marks=pytest.mark.skipif(not shutil.which(name), reason=f"{name} not installed"))
    for name in ("bwrap", "unshare")
]
BASE = dict(timeout_s=60, prewarm=False, max_concurrency=1)
FLIP = ("<code>```python\nimport cv2\nimg = cv2.imread('path_to_input_image.jpg')\n"
        "cv2.imwrite('path_to_output_image.jpg', cv2.flip(img, 1))\n```</code>")
STDLIB = ("import json, os, sys, zlib\nprint(json.dumps([sys.prefix, zlib.crc32(b'x'), os.path.exists('/bin/sh')]))")


def _half_white():
  a = np.zeros((10, 16, 3), np.uint8)
  a[:, :8] = 255
  return Image.fromarray(a)


def _assert_flipped(result):
  assert result.ok, (result.error, result.stderr)
  out = np.asarray(result.output_image)
  assert out[:, 8:].mean() > 240 and out[:, :8].mean() < 15


def _make_venv(folder):
  """A `python -m venv` venv whose site-packages also reach this interpreter's (numpy, cv2, PIL) by a .pth."""
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", folder], check=True, capture_output=True)
  python = os.path.join(folder, "bin", "python")
  site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True,
                        capture_output=True, text=True).stdout.strip()
  with open(os.path.join(site, "varft_parent.pth"), "w") as f:
    f.write(os.path.dirname(os.path.dirname(cv2.__file__)) + "\n")
  return python


@pytest.fixture(scope="module")
def venv_python(tmp_path_factory):
  return _make_venv(str(tmp_path_factory.mktemp("layout") / "venv"))


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_venv_runs_opencv_program(venv_python, isolation):
  sb = code_lib.CodeSandbox({**BASE, "python": venv_python, "isolation": isolation})
  assert sb.isolation == isolation
  _assert_flipped(sb.run(FLIP, _half_white()))
  sb.close()


def _chain_venv(root):
  """A venv whose bin/python3.X reaches the real binary over 4 more hops: relative, absolute, through a
  symlinked folder."""
  python = _make_venv(os.path.join(root, "venv"))
  real = os.path.realpath(python)
  os.makedirs(os.path.join(root, "hops", "real"))
  os.symlink(real, os.path.join(root, "hops", "real", "four"))
  os.symlink("real", os.path.join(root, "hops", "folder-link"))
  os.symlink(os.path.join(root, "hops", "folder-link", "four"), os.path.join(root, "hops", "three"))
  os.symlink("three", os.path.join(root, "hops", "two"))
  link = os.path.join(os.path.dirname(python), os.path.basename(real))  # venv/bin/python3.X
  os.remove(link)
  os.symlink(os.path.relpath(os.path.join(root, "hops", "two"), os.path.dirname(link)), link)
  return python


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_multi_hop_symlink_chain(tmp_path, isolation):
  python = _chain_venv(str(tmp_path))
  binary, links = sandbox_launch.interpreter_chain(python)
  assert binary == os.path.realpath(python) and len(links) >= 5  # 4 file hops + the symlinked folder.
  sb = code_lib.CodeSandbox({**BASE, "python": python, "isolation": isolation, "call_memory_mb": 4096})
  _assert_flipped(sb.run(FLIP, _half_white()))
  child = sb.run(
      "import subprocess, sys\nprint(subprocess.run([sys.executable, '-c', 'import cv2; print(7)'], "
      "capture_output=True, text=True, check=True).stdout)", _half_white())
  assert child.stdout.strip() == "7", (child.error, child.stderr)  # The chain is followed inside, too.
  sb.close()


@pytest.mark.skipif(not shutil.which("bwrap"), reason="bubblewrap not installed")
def test_a_chain_the_sandbox_cannot_follow_fails_when_built(tmp_path, monkeypatch):
  """The old behaviour (only the chain's last target bound) must fail at construction, naming the interpreter.
  (bwrap execs the interpreter inside the sandbox; unshare execs it before its chroot.)"""
  python = _chain_venv(str(tmp_path))
  monkeypatch.setattr(sandbox_launch, "interpreter_chain", lambda p: (os.path.realpath(p), []))
  with pytest.raises(RuntimeError, match=f"cannot start Python {re.escape(python)} .bwrap: .*No such file"):
    code_lib.CodeSandbox({**BASE, "python": python, "isolation": "bwrap"})


def _stdlib_run(python, isolation):
  sb = code_lib.CodeSandbox({
      **BASE, "python": python,
      "isolation": isolation,
      "preload": (),
      "require_output_image": False
  })
  r = sb.run(STDLIB)
  sb.close()
  assert r.ok, (r.error, r.stderr)
  return r.stdout


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_base_prefix_interpreter(isolation):
  """The interpreter the venv was made from (a pyenv prefix here, or the system's)."""
  python = os.path.realpath(sys._base_executable)  # pylint: disable=protected-access
  assert _stdlib_run(python, isolation).endswith(", false]\n")  # No /bin/sh inside.


@pytest.mark.skipif(not os.path.exists("/usr/bin/python3"), reason="no system interpreter")
@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_system_interpreter(isolation):
  out = _stdlib_run("/usr/bin/python3", isolation)
  assert out.startswith('["/usr"') and out.endswith(", false]\n")


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_conda_style_prefix(tmp_path, isolation):
  """A self-contained prefix (bin/python + lib/python3.X), as conda and standalone builds lay it out."""
  base = os.path.realpath(sys._base_executable)  # pylint: disable=protected-access
  stdlib = os.path.dirname(os.__file__)
  prefix = tmp_path / "conda-env"
  (prefix / "bin").mkdir(parents=True)
  (prefix / "lib").mkdir()
  shutil.copy2(base, prefix / "bin" / "python3")
  os.symlink(stdlib, prefix / "lib" / os.path.basename(stdlib))
  out = _stdlib_run(str(prefix / "bin" / "python3"), isolation)
  assert out.startswith(f'["{prefix}"')


def test_isolation_is_detected_with_the_real_command_line(monkeypatch, caplog):
  """A bwrap that passes a trivial probe but cannot run the real command line is not picked."""
  if not (shutil.which("bwrap") and shutil.which("unshare")):
    pytest.skip("needs bubblewrap and unshare")
  command = sandbox_launch.command

  def broken_bwrap(isolation, *args):
    cmd = command(isolation, *args)
    return cmd[:1] + ["--ro-bind", "/nonexistent-varft", "/x"] + cmd[1:] if isolation == "bwrap" else cmd

  monkeypatch.setattr(sandbox_launch, "command", broken_bwrap)
  with caplog.at_level(logging.INFO, logger="varft.tools.code"):
    sb = code_lib.CodeSandbox(BASE)
  assert sb.isolation == "unshare" and "isolation=unshare" in caplog.text
  assert "cannot start Python with bwrap: " in caplog.text  # Said once, with bwrap's own reason.
  _assert_flipped(sb.run(FLIP, _half_white()))
  sb.close()
  with pytest.raises(RuntimeError, match="cannot start Python .*bwrap: .*nonexistent-varft"):
    code_lib.CodeSandbox({**BASE, "isolation": "bwrap"})


def test_an_interpreter_that_does_not_run_fails_when_built(tmp_path):
  fake = tmp_path / "python3"
  fake.write_text("#!/bin/sh\nexit 3\n")
  fake.chmod(0o755)
  with pytest.raises(RuntimeError, match=f"cannot run the interpreter {fake}"):
    code_lib.CodeSandbox({**BASE, "python": str(fake)})
