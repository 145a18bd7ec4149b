"""Rollouts with images on an 8-device mesh: each device encodes only its own rows' images, same greedy result."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_rollout_on_8_devices_encodes_each_image_once_where_its_rows_live():
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
  out = subprocess.run([sys.executable, "-m", "tests.rollout.mesh_script"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
  assert lines["TOKENS"] == "True" and float(lines["LOGPS"]) <= 1e-5, out.stdout
  # 8 prompts, 2 rows each, 2 rows per device: 8 encodings on one device and on eight (not 8 x 8 replicated).
  assert lines["ENCODED"] == "8 8", out.stdout
  assert lines["TABLE"] == "8x64x1176", out.stdout  # the training batch: one table per device, one image each
  # Sampling weights 2-way tensor parallel: the same greedy tokens, rows (and image tables) over 4 devices.
  equal, logps, tables = lines["TP2"].split()
  assert equal == "True" and float(logps) <= 1e-5 and tables == "4", out.stdout
