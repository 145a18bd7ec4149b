"""Hostile programs against the code sandbox: each must be contained, and the host must stay intact.

All programs run once, concurrently (module fixture), through the real sandbox; each test then asserts what
actually happened inside (the read failed, the connection never arrived, the daemon is gone, ...).
"""
import base64
import concurrent.futures
import os
import socket
import struct
import uuid
import zlib

import numpy as np
from PIL import Image
import pytest

from varft.tools import code as code_lib

PROJECT_FILE = os.path.abspath(__file__)
MARKER = f"varft-daemon-{uuid.uuid4().hex}"
SHORT, LONG = 2.0, 30.0  # Per-call wall limits: programs meant to hang vs programs meant to finish.
# call_memory_mb: as a normal user (no cgroups) a call may hold 4 tasks of 1024 MiB (see rlimit-only mode).
CONFIG = dict(timeout_s=LONG, memory_mb=1024, call_memory_mb=4096, max_procs=32, max_file_mb=16, work_mb=64, preload=(),
              require_output_image=False, max_concurrency=8, stdout_cap=4096)


def _png_header_bomb(width, height):
  """A tiny PNG whose header claims width x height pixels (decoding it would need gigabytes)."""

  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

  ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
  return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _attempts(pairs):
  """Program text that runs each `label: statement` and prints `label ok` or `label failed <Error>`."""
  lines = ["import os, sys, socket, subprocess, ctypes, signal"]
  for label, stmt in pairs:
    lines += [
        "try:", f"  {stmt}", f"  print('{label} ok', flush=True)", "except BaseException as e:",
        f"  print('{label} failed', type(e).__name__, flush=True)"
    ]
  return "\n".join(lines)


def _host_listener():
  srv = socket.socket()
  srv.bind(("127.0.0.1", 0))
  srv.listen(8)
  srv.settimeout(0.2)
  return srv


def _programs(tmp, port, canary):
  outside = [
      os.path.join(tmp, "escaped"), "/usr/lib/varft-escaped", "/varft-escaped",
      os.path.join(os.path.dirname(PROJECT_FILE), "varft-escaped")
  ]
  bomb = base64.b64encode(_png_header_bomb(200_000, 200_000)).decode()
  return {
      # name: (program, wall limit)
      "fork_bomb": ("import os, time\nwhile True:\n  try:\n    os.fork()\n  except OSError:\n"
                    "    print('fork refused', flush=True)\n    time.sleep(0.05)\n", SHORT),
      "memory_bomb": ("x = bytearray(8 << 30)\n", LONG),
      "memory_creep": ("chunks = []\nwhile True:\n  chunks.append(bytearray(64 << 20))\n", LONG),
      "cpu_loop": ("while True:\n  pass\n", SHORT),
      "sleep": ("import time\ntime.sleep(120)\n", SHORT),
      "thread_spin": ("import threading\ndef spin():\n  while True:\n    pass\n"
                      "for _ in range(2):\n  threading.Thread(target=spin, daemon=True).start()\n"
                      "threading.Event().wait()\n", SHORT),
      "huge_stdout": ("import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(48):\n  sys.stdout.write(chunk)\n"
                      "sys.stdout.write('THE-END')\n", LONG),
      "big_file": ("with open('big.bin', 'wb') as f:\n  while True:\n    f.write(bytes(1 << 20))\n", LONG),
      "disk_fill": ("i = 0\nwhile True:\n  with open(f'f{i}', 'wb') as f:\n    f.write(bytes(8 << 20))\n"
                    "  i += 1\n", LONG),
      "write_outside": (_attempts([(f"w{i}", f"open({p!r}, 'w').write('x')") for i, p in enumerate(outside)] +
                                  [("rm", f"os.remove({canary!r})")]), LONG),
      "read_secrets": (_attempts([("passwd", "open('/etc/passwd').read()"), ("shadow", "open('/etc/shadow').read()"),
                                  ("project", f"open({PROJECT_FILE!r}).read()"),
                                  ("canary", f"open({canary!r}).read()")]) +
                       "\nprint('HOME', sorted(os.listdir('/root')) if os.path.isdir('/root') else [])", LONG),
      "network": (_attempts([("tcp", f"socket.create_connection(('127.0.0.1', {port}), timeout=2)"),
                             ("dns", "socket.getaddrinfo('example.com', 80)"),
                             ("udp", "socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', "
                              "('8.8.8.8', 53))")]), LONG),
      "shell": (_attempts([("system", "assert os.system('cat /etc/passwd') == 0"),
                           ("popen", "subprocess.run(['/bin/sh', '-c', 'id'], check=True)"),
                           ("child_read", "subprocess.run([sys.executable, '-c', "
                            "'open(\"/etc/passwd\").read()'], check=True)")]), LONG),
      "ctypes": (
          _attempts([
              ("mount", "assert ctypes.CDLL(None).mount(b'none', b'/work', b'tmpfs', 0, None)"
               " == 0"),
              # uid 0 with capabilities (as a normal user the program is uid 0 of its user
              # namespace already, but without any capability).
              ("setuid0", "assert ctypes.CDLL(None).setuid(0) == 0 and int(open('/proc/self/"
               "status').read().split('CapEff:')[1].split()[0], 16) != 0"),
              ("chroot", "os.chroot('/work')"),
              ("unshare", "assert ctypes.CDLL(None).unshare(0x40000000) == 0"),
              ("userns", "assert ctypes.CDLL(None).unshare(0x10000000) == 0"),
              ("bpf", "assert ctypes.CDLL(None).syscall(321 if os.uname().machine == 'x86_64' "
               "else 280, 0, 0, 0) >= 0")
          ]),
          LONG),
      "threads_and_children": ("import threading, subprocess, sys\nt = threading.Thread(target=print, args=('thread',))"
                               "\nt.start()\nt.join()\nprint(subprocess.run([sys.executable, '-c', 'print(7)'], "
                               "capture_output=True, text=True).stdout.strip())\n", LONG),
      "signals":
          (_attempts([("parent", "os.kill(os.getppid(), signal.SIGKILL)"), ("init", "os.kill(1, signal.SIGKILL)"),
                      ("host", f"os.kill({os.getpid()}, signal.SIGKILL)")]), LONG),
      "daemon": ("import os, sys\nif os.fork() == 0:\n  os.setsid()\n  if os.fork() == 0:\n"
                 f"    os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(300)', "
                 f"'{MARKER}'])\n  os._exit(0)\nprint('parent done', flush=True)\n", LONG),
      "proc_view": ("import os\npids = [p for p in os.listdir('/proc') if p.isdigit()]\n"
                    "print('PIDS', len(pids), open('/proc/1/cmdline').read().replace('\\0', ' ')[:400])\n", LONG),
      "environment": ("import os\nprint('ENV', sorted(os.environ))\n", LONG),
      "symlink_output": ("import os\nos.symlink('path_to_input_image.jpg', 'path_to_output_image.jpg')\n", LONG),
      "fifo_output": ("import os\nos.mkfifo('path_to_output_image.jpg')\n", LONG),
      "bomb_output":
          (f"import base64\nopen('path_to_output_image.jpg', 'wb').write(base64.b64decode('{bomb}'))\n", LONG),
      "garbage_output": ("open('path_to_output_image.jpg', 'w').write('not an image')\n", LONG),
      "exception": ("def f():\n  raise ValueError('bad crop box')\nf()\n", LONG),
  }


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
  tmp = str(tmp_path_factory.mktemp("adversarial"))
  canary = os.path.join(tmp, "canary.txt")
  with open(canary, "w") as f:
    f.write("intact")
  srv = _host_listener()
  sandbox = code_lib.CodeSandbox(CONFIG)
  image = Image.fromarray(np.full((8, 8, 3), 200, np.uint8))
  os.environ["VARFT_TEST_SECRET"] = "hunter2"
  try:
    programs = _programs(tmp, srv.getsockname()[1], canary)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
      futures = {
          name: pool.submit(sandbox.run, prog, {"path_to_input_image.jpg": image}, timeout_s=limit)
          for name, (prog, limit) in programs.items()
      }
      results = {name: f.result() for name, f in futures.items()}
    accepted = []
    try:
      accepted.append(srv.accept())
    except OSError:
      pass
  finally:
    del os.environ["VARFT_TEST_SECRET"]
    srv.close()
  return dict(results=results, tmp=tmp, canary=canary, accepted=accepted, sandbox=sandbox)


def _lines(result):
  return set(result.stdout.splitlines())


def test_at_least_twenty_programs(outcome):
  assert len(outcome["results"]) >= 20


def test_fork_bomb_hits_process_limit_and_is_killed(outcome):
  r = outcome["results"]["fork_bomb"]
  assert "fork refused" in r.stdout  # RLIMIT_NPROC held: forks were refused inside.
  assert not r.ok and r.error.startswith("timeout")
  assert r.wall_s < SHORT + 6


@pytest.mark.parametrize("name", ["memory_bomb", "memory_creep"])
def test_memory_bombs_hit_memory_limit(outcome, name):
  r = outcome["results"][name]
  assert not r.ok and r.error.startswith("memory limit exceeded"), r.error


@pytest.mark.parametrize("name", ["cpu_loop", "sleep", "thread_spin"])
def test_hangs_are_killed_at_wall_limit(outcome, name):
  r = outcome["results"][name]
  assert not r.ok and r.error.startswith("timeout")
  assert SHORT <= r.wall_s < SHORT + 6


def test_huge_stdout_is_capped(outcome):
  r = outcome["results"]["huge_stdout"]
  assert r.ok, r.error
  assert len(r.stdout) < 4096 + 100
  assert "bytes omitted" in r.stdout and r.stdout.endswith("THE-END")


def test_big_file_hits_file_size_limit(outcome):
  r = outcome["results"]["big_file"]
  assert not r.ok and r.error.startswith("file size limit exceeded")


def test_disk_fill_hits_tmpfs_quota(outcome):
  r = outcome["results"]["disk_fill"]
  assert not r.ok and "No space left on device" in r.error


def test_writes_outside_work_dir_fail_and_host_files_intact(outcome):
  r = outcome["results"]["write_outside"]
  assert {"w0 failed", "w1 failed", "w2 failed", "w3 failed"} <= {l.rsplit(" ", 1)[0] for l in _lines(r)}
  assert any(l.startswith("rm failed") for l in _lines(r))
  assert not os.path.exists(os.path.join(outcome["tmp"], "escaped"))
  assert not os.path.exists("/usr/lib/varft-escaped") and not os.path.exists("/varft-escaped")
  with open(outcome["canary"]) as f:
    assert f.read() == "intact"


def test_host_files_are_invisible(outcome):
  r = outcome["results"]["read_secrets"]
  for label in ("passwd", "shadow", "project", "canary"):
    assert f"{label} failed FileNotFoundError" in _lines(r), r.stdout
  home_line = [l for l in _lines(r) if l.startswith("HOME")][0]
  host_home = set(os.listdir("/root")) - {".pyenv"} if os.access("/root", os.R_OK) else set()
  assert not any(repr(name) in home_line for name in host_home)


def test_no_network(outcome):
  r = outcome["results"]["network"]
  assert {l.split()[1] for l in _lines(r)} == {"failed"}, r.stdout
  assert outcome["accepted"] == []  # The host listener never saw a connection.


def test_no_shell_and_children_stay_inside(outcome):
  r = outcome["results"]["shell"]
  lines = {l.split()[0]: l.split()[1] for l in _lines(r)}
  assert lines == {"system": "failed", "popen": "failed", "child_read": "failed"}, r.stdout


def test_ctypes_cannot_regain_privileges(outcome):
  r = outcome["results"]["ctypes"]
  assert {l.split()[1] for l in _lines(r)} == {"failed"}, r.stdout
  assert len(_lines(r)) == 6  # mount, setuid0, chroot, unshare(net), user namespace, bpf.


def test_seccomp_leaves_threads_and_subprocesses_working(outcome):
  r = outcome["results"]["threads_and_children"]
  assert r.stdout.split() == ["thread", "7"], (r.stdout, r.stderr)


def test_signals_cannot_reach_parent_or_host(outcome):
  r = outcome["results"]["signals"]
  lines = {l.split()[0]: " ".join(l.split()[1:]) for l in _lines(r)}
  assert lines["parent"] == "failed PermissionError"
  assert lines["init"] == "failed PermissionError"
  assert lines["host"].startswith("failed")  # The host's pid does not exist in the sandbox's pid namespace.
  assert r.ok, r.error


def test_daemon_does_not_outlive_the_call(outcome):
  r = outcome["results"]["daemon"]
  assert "parent done" in r.stdout
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        assert MARKER.encode() not in f.read()
    except OSError:
      pass  # Exited while we looked.


@pytest.mark.skipif(os.geteuid() != 0, reason="per-slot uids are used only when the trainer runs as root")
def test_no_sandbox_process_survives(outcome):
  slot_uids = {str(uid) for uid in outcome["sandbox"].slot_uids}
  survivors = []
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/status") as f:
        uid = [l.split()[1] for l in f if l.startswith("Uid:")][0]
    except (OSError, IndexError):
      continue
    if uid in slot_uids:
      survivors.append(pid)
  assert survivors == []


def test_pid_namespace_hides_host_processes(outcome):
  r = outcome["results"]["proc_view"]
  count = int(r.stdout.split()[1])
  assert count < 10
  assert "init.py" in r.stdout


def test_environment_does_not_leak(outcome):
  r = outcome["results"]["environment"]
  assert "VARFT_TEST_SECRET" not in r.stdout and "'HOME'" in r.stdout


@pytest.mark.parametrize("name,message", [
    ("symlink_output", "is a symbolic link"),
    ("fifo_output", "is not a regular file"),
    ("bomb_output", "is too large"),
    ("garbage_output", "not a readable image"),
])
def test_bad_output_images_are_rejected(outcome, name, message):
  r = outcome["results"][name]
  assert not r.ok and r.output_image is None and message in r.error, r.error


def test_exception_reports_last_traceback_line(outcome):
  r = outcome["results"]["exception"]
  assert r.error == "exception: ValueError: bad crop box"
  assert "Traceback" in r.stderr
