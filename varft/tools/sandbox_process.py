"""Running one sandbox process: the launcher of one isolation mechanism (per-process limits, the call spec, the
start-up check), the host side of the call (inputs and the program out over stdin; stdout, stderr and the result
pipe in, each capped, under a deadline), and cleaning up after it. See `varft.tools.code` for the whole picture."""
import dataclasses
import json
import math
import os
import selectors
import signal
import subprocess
import time

from PIL import Image

from varft.tools import cgroups as cgroups_lib
from varft.tools import sandbox_init
from varft.tools import sandbox_launch as launch

PROGRAM_NAME = "main.py"
INIT_GRACE_S = 1.0  # The host's wall-clock kill comes this long after the init's own (a backstop).
STARTUP_TIMEOUT_S = 60.0
_STARTED_OK = set()  # Command lines + limits that already started Python here (the check runs once each).
# Tasks of the sandbox's own uid that are not the program's, in a user namespace (RLIMIT_NPROC counts them).
_INIT_TASKS = {"bwrap": 1, "unshare": 2}


class _Capped:
  """Keeps the first and last `cap // 2` bytes of a stream (tracebacks end at the tail)."""

  def __init__(self, cap):
    self.half = max(cap // 2, 1)
    self.head = bytearray()
    self.tail = bytearray()
    self.total = 0

  def add(self, chunk):
    self.total += len(chunk)
    room = self.half - len(self.head)
    if room > 0:
      self.head += chunk[:room]
      chunk = chunk[room:]
    if chunk:
      self.tail += chunk
      del self.tail[:-self.half]

  def text(self):
    omitted = self.total - len(self.head) - len(self.tail)
    middle = f"\n... [{omitted} bytes omitted] ...\n".encode() if omitted else b""
    return bytes(self.head + middle + self.tail).decode("utf-8", "replace")


def drain(proc, deadline, cap, send, result_fd, result_cap):
  """Writes `send` to the sandbox's stdin and reads stdout/stderr (capped) and the result pipe (up to
  `result_cap` bytes) until EOF or the deadline; kills the process group at the deadline.
  Returns (stdout, stderr, result bytes, timed_out)."""
  bufs = {proc.stdout.fileno(): _Capped(cap), proc.stderr.fileno(): _Capped(cap)}
  result = bytearray()
  pending = memoryview(send)
  timed_out = False
  with selectors.DefaultSelector() as sel:
    for fd in (*bufs, result_fd):
      os.set_blocking(fd, False)
      sel.register(fd, selectors.EVENT_READ)
    if pending:
      os.set_blocking(proc.stdin.fileno(), False)
      sel.register(proc.stdin.fileno(), selectors.EVENT_WRITE)
    else:
      proc.stdin.close()
    while sel.get_map():
      remaining = deadline - time.monotonic()
      if remaining <= 0:
        if timed_out:  # Already killed and the grace period is over: stop waiting for stray pipe holders.
          break
        timed_out = True
        _kill_group(proc)
        deadline = time.monotonic() + 5.0
        continue
      for key, _ in sel.select(timeout=remaining):
        if key.events & selectors.EVENT_WRITE:
          try:
            pending = pending[os.write(key.fd, pending):]
          except BlockingIOError:
            continue
          except BrokenPipeError:  # It died; reported as a sandbox failure with its stderr.
            pending = pending[:0]
          if not pending:
            sel.unregister(key.fd)
            proc.stdin.close()
          continue
        try:
          chunk = os.read(key.fd, 1 << 20 if key.fd == result_fd else 1 << 16)
        except BlockingIOError:
          continue
        if not chunk:
          sel.unregister(key.fd)
        elif key.fd == result_fd:
          result += chunk[:max(result_cap + 1 - len(result), 0)]
        else:
          bufs[key.fd].add(chunk)
  try:
    proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
  except subprocess.TimeoutExpired:
    timed_out = True
    _kill_group(proc)
    proc.wait()
  return bufs[proc.stdout.fileno()].text(), bufs[proc.stderr.fileno()].text(), result, timed_out


def _kill_group(proc):
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except ProcessLookupError:
    pass


def parse_result(raw, max_pixels):
  """(header dict or None, image or None) from the result pipe's bytes: the decoder's raw RGB pixels, then the
  init's JSON trailer, then the trailer's length (4 bytes, big-endian)."""
  size = int.from_bytes(raw[-4:], "big") if len(raw) >= 4 else -1
  if not 0 < size <= min(len(raw) - 4, sandbox_init.HEADER_CAP):
    return None, None
  try:
    header = json.loads(raw[-4 - size:-4])
  except ValueError:
    return None, None
  if not isinstance(header, dict):
    return None, None
  if header.get("output") != "ok":
    return header, None
  pixels = memoryview(raw)[:-4 - size]
  w, h = header.get("width"), header.get("height")
  if not (isinstance(w, int) and isinstance(h, int) and 1 <= w and 1 <= h and w * h <= max_pixels and
          len(pixels) == 3 * w * h):
    return {**header, "output": "decode_failed"}, None
  return header, Image.frombytes("RGB", (w, h), pixels)


class Launcher:
  """Starts and runs the sandbox processes of one mechanism. Holds no reference to its CodeSandbox, so the warm-up
  thread never keeps one alive (and never runs its finalizer)."""

  def __init__(self, config, isolation, root, mounts, python, slot_uids, cgroups):
    self.config, self.isolation, self._root = config, isolation, root
    self._mounts, self.python, self.slot_uids, self.cgroups = mounts, python, slot_uids, cgroups
    self.own_tasks = 0 if root else _INIT_TASKS[isolation]
    self.work_dir = launch.work_dir(mounts)
    self.rlimits = self._rlimits()

  def _rlimits(self):
    c = self.config
    memory_mb, tasks = c.memory_mb, c.max_procs
    if self.cgroups is None:  # rlimit-only mode: tasks x memory per task stays within the call's budget.
      budget = c.call_memory_mb or c.memory_mb
      tasks = min(c.max_procs, max(1, budget // c.memory_mb))
      memory_mb = min(c.memory_mb, budget // tasks)
    mb = 1 << 20
    return {
        "RLIMIT_AS": memory_mb * mb,
        "RLIMIT_NPROC": tasks + self.own_tasks,
        "RLIMIT_FSIZE": c.max_file_mb * mb,
        "RLIMIT_NOFILE": c.max_open_files,
        "RLIMIT_CORE": 0
    }

  def _spec(self, uid, warm):
    c = self.config
    return {
        "mode": self.isolation,
        "root_dir": None,
        "mounts": [list(m) for m in self._mounts],
        "uid": uid,
        "work_mb": c.work_mb,
        "work_inodes": c.work_inodes,
        "program": PROGRAM_NAME,
        "output_name": c.output_name,
        "max_output_bytes": c.max_output_mb << 20,
        "max_output_pixels": c.max_output_pixels,
        "max_output_side": c.max_output_side,
        "observe_pixels": c.observe_max_pixels,
        "preload": list(c.preload) if warm else [],
        "seccomp": c.seccomp,
        "rlimits": self.rlimits,
        "work_dir": self.work_dir,
        "env": launch.program_env(self.work_dir),
    }

  def start(self, slot, warm):
    """Starts a sandbox for `slot` up to the point where it waits for its program (on stdin); a `warm` one
    (started ahead of its call) also pre-imports config.preload while it waits."""
    spec = self._spec(self.slot_uids[slot] if self._root else None, warm)
    scratch = None
    try:
      if self.isolation == "unshare":
        scratch = spec["root_dir"] = launch.make_scratch(self.config.tmp_dir)
        spec["mounts"] += [list(m) for m in launch.unshare_extra_mounts(self._mounts)]
      proc, result_fd = launch.start(
          lambda fd: launch.command(self.isolation, self._root, self._mounts, self.python, fd), spec, self.cgroups,
          slot)
    except BaseException:
      if scratch:
        os.rmdir(scratch)
      raise
    return Started(proc, result_fd, scratch, slot, self.cgroups)

  def call(self, started, program, inputs, timeout):
    """Hands the program and inputs to a started sandbox, waits, cleans up. Returns (stdout, stderr, result
    header or None, image or None, timed_out, oom_killed)."""
    c = self.config
    files = {**inputs, PROGRAM_NAME: program.encode()}
    cpu = c.cpu_s if c.cpu_s is not None else timeout + 1
    go = {
        "inputs": [[name, len(data)] for name, data in files.items()],
        "cpu_s": max(1, math.ceil(cpu)),
        "wall_s": timeout,
        "decode_s": c.output_decode_s
    }
    max_pixels = c.observe_max_pixels or c.max_output_pixels
    deadline = time.monotonic() + timeout + c.output_decode_s + 2 * INIT_GRACE_S
    try:
      oom_before = self.cgroups.oom_kills(started.slot) if self.cgroups else 0
      stdout, stderr, raw, timed_out = drain(started.proc, deadline, c.stdout_cap,
                                             json.dumps(go).encode() + b"\n" + b"".join(files.values()),
                                             started.result_fd, sandbox_init.HEADER_CAP + 4 + 3 * max_pixels)
      oom_killed = bool(self.cgroups) and self.cgroups.oom_kills(started.slot) > oom_before
    finally:
      discard(started)
    header, image = parse_result(raw, max_pixels)
    return stdout, stderr, header, image, timed_out, oom_killed

  def check_startup(self, modules):
    """Runs one real program (importing `modules`) the way every call will; None if it worked, else why not."""
    c = self.config
    key = (tuple(launch.command(self.isolation, self._root, self._mounts, self.python, 0)),
           tuple(sorted(self.rlimits.items())), c.seccomp, tuple(modules), c.work_mb, c.work_inodes)
    if key in _STARTED_OK:
      return None
    program = "".join(f"import {name}\n" for name in modules) + "print('varft-sandbox-ok')\n"
    try:
      started = self.start(0, False)
    except OSError as e:
      return f"cannot start it ({e})"
    stdout, stderr, header, _, timed_out, _ = self.call(started, program, {}, STARTUP_TIMEOUT_S)
    if header and header.get("exit_code") == 0 and "varft-sandbox-ok" in stdout:
      _STARTED_OK.add(key)
      return None
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return (lines[-1] if lines else "timed out" if timed_out else "exited without a word")[:300]


@dataclasses.dataclass
class Started:
  """A sandbox process waiting for (or running) its one program."""
  proc: subprocess.Popen
  result_fd: int
  scratch: str | None
  slot: int
  cgroups: cgroups_lib.SlotCgroups | None = None


def discard(started):
  """Kills what is left of a sandbox process tree and closes its pipes (and removes its mount point)."""
  if started.proc.poll() is None:
    _kill_group(started.proc)
  for f in (started.proc.stdin, started.proc.stdout, started.proc.stderr):
    if f:
      f.close()
  if started.result_fd >= 0:
    os.close(started.result_fd)
    started.result_fd = -1
  started.proc.wait()
  if started.cgroups:
    started.cgroups.kill_all(started.slot)  # Belt and braces: the pid namespace is already going down.
  if started.scratch:
    os.rmdir(started.scratch)


def shutdown(spawner, warm, cgroups, uid_lock):
  """Finalizer of a CodeSandbox: no reference to it, only to what must be cleaned up. Never blocks (it may run
  in any thread, the spawner's included, when the garbage collector finds the sandbox): a warm sandbox still
  being started is discarded by a callback once its start completes."""

  def discard_once_started(future):
    if not future.cancelled() and future.exception() is None:
      discard(future.result())
    if cgroups:
      cgroups.close()  # Retried after each discard: a cgroup can only go once it is empty.

  if spawner:
    spawner.shutdown(wait=False, cancel_futures=True)
  for future in list(warm.values()):
    future.add_done_callback(discard_once_started)
  warm.clear()
  if cgroups:
    cgroups.close()
  if uid_lock is not None:
    os.close(uid_lock)
