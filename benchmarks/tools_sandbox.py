"""Code tool: the isolated sandbox vs an unisolated `subprocess.run([python, file])`, side by side.

Both sides run the same real OpenCV program (read the input image, rotate it by 90 degrees, write the output) on
the same 1024x768 JPEG, and both end with the decoded output image on the host: the baseline writes the input
into a fresh directory, runs the program, reads back and decodes the output file; the sandbox sends the input in
over stdin and gets the output back as raw pixels over a pipe, decoded inside the sandbox by a second confined
process. The sandbox adds namespaces (bubblewrap or unshare), a tmpfs, rlimits, a privilege drop, seccomp, a
cgroup and that decoder; it pre-imports numpy/cv2/PIL in the sandbox init (default config), which the baseline's
program has to import itself.

    python benchmarks/tools_sandbox.py [--calls 20] [--burst 48] [--repeats 3] [--isolation auto]

Sides: `baseline` (unisolated), `sandbox_prewarmed` (default config: a started sandbox waits per idle slot,
each used for one call) and `sandbox_cold` (prewarm=False: every call starts its sandbox from scratch).
Prints latency p50/p95 (sequential calls) and throughput at concurrency 8 for each side, medians over
`--repeats` interleaved rounds, and the ratios sandbox/baseline (latency) and baseline/sandbox (throughput),
i.e. >1 means the sandbox is slower.
"""
import argparse
import concurrent.futures
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from varft.tools import code as code_lib
from varft.tools import sandbox_launch

# The sandbox runs programs with one BLAS/OpenMP/OpenCV thread; the baseline gets the same, so that the comparison
# measures isolation, not thread oversubscription (8 concurrent programs on a few cores). Both sides start each
# call in a new session (as any executor that kills process groups must): with the kernel's autogroup
# scheduling a session is a CPU-share unit, so giving only one side new sessions skews throughput on a busy host.
THREAD_ENV = sandbox_launch.THREAD_ENV

PROGRAM = """import cv2
image = cv2.imread('path_to_input_image.jpg')
cv2.imwrite('path_to_output_image.jpg', cv2.rotate(image, cv2.ROTATE_90_CLOCKWISE))
"""


def _input_jpeg():
  y, x = np.mgrid[0:768, 0:1024]
  rng = np.random.default_rng(0)
  a = np.stack([x % 256, y % 256,
                (x + y) % 256], -1).astype(np.uint8) + rng.integers(0, 8, (768, 1024, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(a).save(buf, format="JPEG", quality=90)
  return buf.getvalue()


def baseline_call(jpeg):
  """Unisolated: fresh temp dir, input file, `python main.py`, decode the output."""
  d = tempfile.mkdtemp(prefix="varft-bench-")
  try:
    with open(os.path.join(d, "main.py"), "w") as f:
      f.write(PROGRAM)
    with open(os.path.join(d, "path_to_input_image.jpg"), "wb") as f:
      f.write(jpeg)
    proc = subprocess.run([sys.executable, "main.py"], cwd=d, capture_output=True, timeout=60, check=False, env={
        **os.environ,
        **THREAD_ENV
    }, start_new_session=True)
    assert proc.returncode == 0, proc.stderr
    with open(os.path.join(d, "path_to_output_image.jpg"), "rb") as f:
      image = Image.open(io.BytesIO(f.read()))
      image.load()
    return image.size
  finally:
    shutil.rmtree(d, ignore_errors=True)


def sandbox_call(sandbox, jpeg):
  r = sandbox.run(PROGRAM, {"path_to_input_image.jpg": jpeg})
  assert r.ok, (r.error, r.stderr)
  return r.output_image.size


def latency(fn, n):
  times = []
  for _ in range(n):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  times.sort()
  return times[len(times) // 2], times[min(len(times) - 1, int(round(0.95 * (len(times) - 1))))]


def throughput(fn, n, workers=8):
  t = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    list(pool.map(lambda _: fn(), range(n)))
  return n / (time.perf_counter() - t)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--calls", type=int, default=20, help="sequential calls per latency round")
  parser.add_argument("--burst", type=int, default=48, help="calls per throughput round (8 at a time)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--isolation", default="auto", choices=["auto", "bwrap", "unshare"])
  args = parser.parse_args()
  jpeg = _input_jpeg()
  warm = code_lib.CodeSandbox({"max_concurrency": 8, "timeout_s": 60, "isolation": args.isolation})
  cold = code_lib.CodeSandbox({"max_concurrency": 8, "timeout_s": 60, "isolation": args.isolation, "prewarm": False})
  sides = {
      "baseline": lambda: baseline_call(jpeg),
      "sandbox_prewarmed": lambda: sandbox_call(warm, jpeg),
      "sandbox_cold": lambda: sandbox_call(cold, jpeg)
  }
  assert {fn() for fn in sides.values()} == {(768, 1024)}  # Same work, same answer; warms the page cache.
  rows = {name: [] for name in sides}
  for _ in range(args.repeats):  # Interleaved so that background load hits all sides alike.
    for name, fn in sides.items():
      p50, p95 = latency(fn, args.calls)
      rows[name].append((p50, p95, throughput(fn, args.burst)))
  med = {k: [statistics.median(r[i] for r in v) for i in range(3)] for k, v in rows.items()}
  base = med["baseline"]
  report = {
      "isolation": warm.isolation,
      "cgroup": f"v{warm.cgroups.version}" if warm.cgroups else None,
      "cpus": os.cpu_count(),
      "load_avg_1m": os.getloadavg()[0]
  }
  for name, (p50, p95, tput) in med.items():
    report[name] = {"p50_s": round(p50, 4), "p95_s": round(p95, 4), "calls_per_s_c8": round(tput, 2)}
    if name != "baseline":  # >1: slower than the unisolated baseline.
      report[name].update(ratio_p50=round(p50 / base[0], 3), ratio_p95=round(p95 / base[1], 3),
                          ratio_throughput=round(base[2] / tput, 3))
  warm.close()
  cold.close()
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  main()
