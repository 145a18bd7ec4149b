"""Code sandbox API: program extraction, results and errors, output validation, isolation choice and the
`unshare` fallback (forced through the config) holding the same line as bubblewrap."""
import io
import logging
import os
import shutil
import socket
import struct
import uuid
import zlib

import numpy as np
from PIL import Image
import pytest

from varft.tools import cgroups as cgroups_lib
from varft.tools import code as code_lib
from varft.tools import sandbox_process

FAST = dict(timeout_s=30, preload=(), max_concurrency=4, prewarm=False)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("<think>rotate</think>\n<code>```python\nprint(1)\n```</code>", "print(1)"),
        ("<code>\n```py\nx = 1\nprint(x)\n```\n</code>", "x = 1\nprint(x)"),
        ("<code>```\nprint(2)\n```</code>", "print(2)"),
        ("<code>print(3)</code>", "print(3)"),
        ("```python\nprint(4)\n```", "print(4)"),
        ("<code>```python\nprint(5)\n```", "print(5)"),  # Unterminated </code> (the stop tag was cut).
        ("<think>no code here</think>", None),
        ("<code>   </code>", None),
    ])
def test_extract_program(text, expected):
  assert code_lib.extract_program(text) == expected


def _png_bytes(width, height):

  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) +
          chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def test_load_output_image_validation():
  buf = io.BytesIO()
  Image.new("L", (30, 20), 7).save(buf, format="PNG")
  image = code_lib.load_output_image(buf.getvalue(), 10_000, 1000)
  assert image.mode == "RGB" and image.size == (30, 20)
  with pytest.raises(ValueError, match="too large: 200x200"):
    code_lib.load_output_image(_png_bytes(200, 200), 10_000, 1000)
  with pytest.raises(ValueError, match="too large"):
    code_lib.load_output_image(_png_bytes(100_000, 100_000), 10 ** 12, 10 ** 6)
  with pytest.raises(ValueError, match="corrupt or truncated"):
    code_lib.load_output_image(_png_bytes(50, 50), 10_000, 1000)  # Header fine, pixel data missing.
  with pytest.raises(ValueError, match="not a readable image"):
    code_lib.load_output_image(b"GIF89a nonsense", 10_000, 1000)
  buf = io.BytesIO()
  Image.new("RGB", (4, 4)).save(buf, format="GIF")
  with pytest.raises(ValueError, match="format GIF not supported"):
    code_lib.load_output_image(buf.getvalue(), 10_000, 1000)


def test_config_errors():
  with pytest.raises(ValueError, match="unknown code sandbox config keys \\['timeout'\\]"):
    code_lib.SandboxConfig.from_dict({"timeout": 3})
  with pytest.raises(ValueError, match="must be 'auto', 'bwrap' or 'unshare'"):
    code_lib.detect_isolation("docker")
  with pytest.raises(FileNotFoundError, match="sandbox python"):
    code_lib.CodeSandbox({"python": "/nonexistent/python3"})
  with pytest.raises(ValueError, match="code.output_decode_s must be > 0"):
    code_lib.CodeSandbox({"output_decode_s": 0})


@pytest.fixture(scope="module")
def sandbox():
  return code_lib.CodeSandbox(FAST)


def test_auto_prefers_bubblewrap_and_says_so(caplog):
  if not shutil.which("bwrap"):
    pytest.skip("bubblewrap is not installed")
  with caplog.at_level(logging.INFO, logger="varft.tools.code"):
    sb = code_lib.CodeSandbox(FAST)
  assert sb.isolation == "bwrap"
  assert "isolation=bwrap" in caplog.text
  assert code_lib.detect_isolation("auto", FAST) == "bwrap"
  assert code_lib.detect_isolation("unshare", FAST) == "unshare"


def test_stdout_exit_codes_and_missing_output(sandbox):
  r = sandbox.run("print('hello')\nimport sys\nsys.stderr.write('warn')")
  assert not r.ok and r.stdout == "hello\n" and r.stderr == "warn"
  assert r.error == "no output image: the program did not write path_to_output_image.jpg"
  r = sandbox.run("import sys\nsys.exit(3)")
  assert r.error == "the program exited with code 3"
  relaxed = code_lib.CodeSandbox({**FAST, "require_output_image": False})
  r = relaxed.run("print('no image needed')")
  assert r.ok and r.error is None and r.output_image is None and r.cpu_s is not None
  r = sandbox.run("<think>I will not write code</think>")
  assert not r.ok and r.error.startswith("no program found")


def test_inputs_are_checked_and_placed(sandbox):
  r = sandbox.run("print(1)", {"../evil.jpg": Image.new("RGB", (2, 2))})
  assert not r.ok and "not allowed" in r.error
  r = sandbox.run("print(1)", {"main.py": b"x"})
  assert not r.ok and "not allowed" in r.error
  program = ("import os\nprint(sorted(os.listdir('.')), open('notes.txt').read())\n"
             "from PIL import Image\nImage.open('path_to_input_image.jpg').save('path_to_output_image.jpg', "
             "format='PNG')\n")
  image = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3))
  r = sandbox.run(program, {"path_to_input_image.jpg": image, "notes.txt": b"hi"})
  assert r.ok, r.error
  assert r.stdout == "['main.py', 'notes.txt', 'path_to_input_image.jpg'] hi\n"
  np.testing.assert_array_equal(np.asarray(r.output_image), np.asarray(image))  # Lossless both ways.
  r = sandbox.run(program.replace(", open('notes.txt').read()", ""), image)  # A bare image is the input image.
  assert r.ok


@pytest.mark.parametrize("prewarm", [False, True])
def test_calls_are_isolated_from_each_other(prewarm):
  sb = code_lib.CodeSandbox({**FAST, "prewarm": prewarm, "max_concurrency": 1})  # One slot, reused.
  first = sb.run("import os\nopen(os.environ['HOME'] + '/left-behind', 'w').write('x')\nprint(os.getuid())")
  second = sb.run("import os\nprint(os.path.exists(os.environ['HOME'] + '/left-behind'), os.getuid())")
  assert second.stdout.split()[0] == "False"
  if os.geteuid() == 0:
    assert int(first.stdout) >= code_lib.SandboxConfig.uid_base  # Never root inside.
  sb.close()


def test_prewarmed_sandbox_waits_and_close_stops_it():
  sb = code_lib.CodeSandbox({**FAST, "prewarm": True, "max_concurrency": 1, "preload": ("cv2",)})
  probe = "import sys\nprint('cv2' in sys.modules)"
  assert sb.run(probe).stdout == "True\n"  # Imported while it waited.
  cold = code_lib.CodeSandbox({**FAST, "preload": ("cv2",)})
  assert cold.run(probe).stdout == "False\n"  # A cold start does not pay for imports up front.
  waiting = sb._warm[0].result(timeout=30)  # pylint: disable=protected-access
  assert waiting.proc.poll() is None and waiting.result_fd >= 0
  sb.close()
  assert waiting.proc.poll() is not None and waiting.result_fd == -1


@pytest.fixture(scope="module")
def fallback():
  if not shutil.which("unshare"):
    pytest.skip("util-linux unshare is not installed")
  sb = code_lib.CodeSandbox({
      **FAST, "isolation": "unshare",
      "preload": ("numpy", "cv2"),
      "prewarm": True,
      "max_concurrency": 2,
      "call_memory_mb": 4096
  })  # 2 tasks without cgroups.
  yield sb
  sb.close()


def test_unshare_fallback_runs_opencv_programs(fallback):
  assert fallback.isolation == "unshare"
  a = np.zeros((10, 16, 3), np.uint8)
  a[:, :8] = 255
  program = ("<code>```python\nimport cv2\nimg = cv2.imread('path_to_input_image.jpg')\n"
             "cv2.imwrite('path_to_output_image.jpg', cv2.flip(img, 1))\n```</code>")
  r = fallback.run(program, Image.fromarray(a))
  assert r.ok, (r.error, r.stderr)
  out = np.asarray(r.output_image)
  assert out[:, 8:].mean() > 240 and out[:, :8].mean() < 15


def test_unshare_fallback_contains_hostile_programs(fallback, tmp_path):
  marker = f"varft-daemon-{uuid.uuid4().hex}"
  srv = socket.socket()
  srv.bind(("127.0.0.1", 0))
  srv.listen(1)
  srv.settimeout(0.2)
  port = srv.getsockname()[1]
  try:
    probe = fallback.run(
        "import os, socket, sys\n"
        "for label, fn in [('passwd', lambda: open('/etc/passwd').read()),\n"
        f"                  ('host', lambda: open({str(tmp_path)!r} + '/x', 'w')),\n"
        f"                  ('tcp', lambda: socket.create_connection(('127.0.0.1', {port}), timeout=1)),\n"
        "                  ('kill', lambda: os.kill(1, 9))]:\n"
        "  try:\n    fn()\n    print(label, 'ok')\n  except Exception as e:\n    print(label, 'failed')\n"
        "if os.fork() == 0:\n  os.setsid()\n"
        f"  os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(300)', '{marker}'])\n"
        "open('path_to_output_image.jpg', 'w')\n")
    hang = fallback.run("while True:\n  pass", timeout_s=1.0)
    memory = fallback.run("x = bytearray(8 << 30)")
    with pytest.raises(OSError):
      srv.accept()
  finally:
    srv.close()
  assert probe.stdout.split("\n")[:4] == ["passwd failed", "host failed", "tcp failed", "kill failed"]
  assert not os.path.exists(tmp_path / "x")
  assert "not a readable image" in probe.error
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        assert marker.encode() not in f.read()
    except OSError:
      pass
  assert hang.error.startswith("timeout") and hang.wall_s < 6
  assert memory.error.startswith("memory limit exceeded")


def test_cgroup_caps_memory_of_the_whole_call():
  sb = code_lib.CodeSandbox({**FAST, "memory_mb": 1024, "call_memory_mb": 384, "max_concurrency": 1})
  if sb.cgroups is None:
    pytest.skip("this host does not let us create memory cgroups")
  # Four processes of ~300 MB each: every one is within RLIMIT_AS, together they exceed the call's budget.
  bomb = ("import os, time\nfor _ in range(2):\n  os.fork()\nx = bytearray(300 << 20)\n"
          "for i in range(0, len(x), 4096):\n  x[i] = 1\ntime.sleep(3)\n")
  r = sb.run(bomb, timeout_s=15)
  assert not r.ok and r.error.startswith("memory limit exceeded (384 MB for the whole call)"), r.error
  slot_dirs = [d for dirs in sb.cgroups.slot_dirs.values() for d in dirs]
  sb.cgroups.close()
  assert not any(os.path.exists(d) for d in slot_dirs)


def test_init_kills_at_wall_limit_even_if_the_host_does_not(monkeypatch):
  sb = code_lib.CodeSandbox({**FAST, "max_concurrency": 1})
  drain = sandbox_process.drain
  monkeypatch.setattr(sandbox_process, "drain", lambda proc, deadline, *rest: drain(proc, deadline + 60, *rest))
  r = sb.run("import time\ntime.sleep(60)", timeout_s=1.0)
  assert r.error.startswith("timeout") and r.wall_s < 1.0 + 5  # Not the host's (now 61 s) deadline.


def test_stale_cgroups_of_dead_processes_are_swept(tmp_path):
  probe = code_lib.CodeSandbox({**FAST, "max_concurrency": 1})
  if probe.cgroups is None:
    pytest.skip("this host does not let us create cgroups")
  parent = os.path.dirname(os.path.dirname(probe.cgroups.slot_dirs[0][0]))
  probe.close()
  dead_pid = 2 ** 22 + 7  # Above pid_max: never a live process.
  stale = os.path.join(parent, f"{cgroups_lib.TAG_PREFIX}{dead_pid}-0")
  os.makedirs(os.path.join(stale, "slot0"))
  code_lib.CodeSandbox({**FAST, "max_concurrency": 1}).close()
  assert not os.path.exists(stale)
