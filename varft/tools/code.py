"""The code tool: runs model-written Python in an isolated, throw-away sandbox.

Every call gets one fresh process tree in new mount/pid/net/ipc/uts namespaces (bubblewrap, or `unshare` when
bubblewrap is missing or cannot run here) that sees only a read-only Python runtime and a size-limited tmpfs
holding its inputs. Inside, `sandbox_init.py` drops to an unprivileged uid (one per concurrency slot when the
trainer runs as root) with rlimits on CPU, memory, processes, file size and open files, no capabilities and a
seccomp filter (no new namespaces or mounts, AF_UNIX stream sockets only, no connect()); where the host allows it,
a per-slot cgroup caps the memory of the whole call. There is no network (a fresh net namespace).

Nothing the program controls is read from the host's file system: inputs go in over the sandbox's stdin, and the
output image comes back over a pipe as raw RGB pixels, decoded inside the sandbox by a confined decoder under its
own clock (`output_decode_s`) and downscaled to what the model will see (`observe_max_pixels`). The init kills
the program at the wall-clock limit; the host kills the whole tree a little later should the init fail to.

The mechanism is chosen by starting a real sandbox with the real command line at construction (bwrap first, then
unshare): a sandbox that cannot start Python fails there, with one error naming the interpreter and what to install.

Speed: with `prewarm` (default) each idle slot holds one sandbox already started up to the point where it waits
for its program (namespaces built, numpy/cv2/PIL imported); a call takes it, runs once, and a new one is started
for the slot in the background. No process ever runs two programs.

What a program can still see: the paths of the runtime it runs on (the interpreter, its prefix or venv, its
site-packages, `extra_ro_paths`) appear under their own names in /proc/self/mountinfo, as they must be mounted
where the interpreter expects them; the checkout, the trainer's folders and any scratch folder do not.

The paper's convention: the program reads `path_to_input_image.jpg` and writes `path_to_output_image.jpg`.
"""
import concurrent.futures
import dataclasses
import io
import json
import logging
import math
import os
import queue
import re
import selectors
import signal
import subprocess
import sys
import time
import weakref

from PIL import Image

from varft.tools import cgroups as cgroups_lib
from varft.tools import sandbox_init
from varft.tools import sandbox_launch as launch

log = logging.getLogger(__name__)

PROGRAM_NAME = "main.py"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
_MODEL_TEXT_MARKERS = ("<code>", "```", "<think>", "<answer>", "<search>")  # Else the text is the program.
_CODE_RE = re.compile(r"<code>(.*?)(?:</code>|$)", re.S)
_FENCE_RE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n?(.*?)```", re.S | re.I)
_INIT_GRACE_S = 1.0  # The host's wall-clock kill comes this long after the init's own (a backstop).
_STARTUP_TIMEOUT_S = 60.0
_STARTED_OK = set()  # Command lines + limits that already started Python here (the check runs once each).
# Tasks of the sandbox's own uid that are not the program's, in a user namespace (RLIMIT_NPROC counts them).
_INIT_TASKS = {"bwrap": 1, "unshare": 2}


@dataclasses.dataclass(frozen=True)
class SandboxConfig:
  """Limits and layout of the code sandbox (all sizes in MiB)."""
  timeout_s: float = 10.0  # Wall clock per call; the whole process tree is killed after it.
  cpu_s: float | None = None  # RLIMIT_CPU per process; default: timeout_s + 1.
  memory_mb: int = 2048  # RLIMIT_AS (virtual; numpy + cv2 + PIL alone map ~0.5 GiB).
  max_procs: int = 64  # RLIMIT_NPROC (threads count); per call when running as root (one uid per slot).
  max_file_mb: int = 64  # RLIMIT_FSIZE.
  max_open_files: int = 256  # RLIMIT_NOFILE.
  work_mb: int = 256  # Size of the tmpfs the program may write to (/work, also $HOME and $TMPDIR).
  work_inodes: int = 4096
  stdout_cap: int = 8192  # Bytes of stdout/stderr kept (head and tail).
  max_output_mb: int = 32
  max_output_pixels: int = 40_000_000  # Largest output image decoded at all.
  max_output_side: int = 16384
  observe_max_pixels: int = 802_816  # Output images are downscaled to this (what the model sees); 0: keep size.
  output_decode_s: float = 5.0  # Wall clock for decoding the output image, inside the sandbox.
  require_output_image: bool = True  # A program that writes no output image is an error (paper's tool).
  # Cap on the whole call (all processes + tmpfs) by a cgroup; without cgroups (rlimit-only mode) the bound of
  # tasks x per-process memory instead. Default: memory_mb.
  call_memory_mb: int | None = None
  cgroup: str = "auto"  # 'auto': use per-slot cgroups where the host allows it; 'off': rlimits only.
  isolation: str = "auto"  # 'auto' (bwrap, else unshare), 'bwrap' or 'unshare'.
  seccomp: bool = True  # Deny namespace/mount/ptrace/bpf/socket/... syscalls to the program (x86_64, aarch64).
  # Imported by a prewarmed sandbox while it waits, so that the program finds them loaded. (Not on a cold start:
  # there it would only lengthen the critical path, by modules the program may not even use.)
  preload: tuple[str, ...] = ("numpy", "cv2", "PIL.Image")
  prewarm: bool = True  # Keep one started (namespaces + preload done) sandbox per idle slot; each runs once.
  max_concurrency: int = 8
  uid_base: int = 1_700_000  # Start of the unprivileged uids the slots run as (root only; see slot_uids).
  input_name: str = "path_to_input_image.jpg"
  output_name: str = "path_to_output_image.jpg"
  input_format: str = "PNG"  # Lossless; cv2/PIL detect the format from the bytes, not the name.
  python: str = sys.executable
  extra_ro_paths: tuple[str, ...] = ()  # More read-only paths the programs may see (e.g. a venv elsewhere).
  tmp_dir: str | None = None  # Host directory for unshare mode's (empty) mount points.

  @classmethod
  def from_dict(cls, d):
    """Builds a config from a dict / ConfigDict, rejecting unknown keys with a clear message."""
    d = dict(d or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"unknown code sandbox config keys {unknown}; known keys: {sorted(known)}")
    for key in ("preload", "extra_ro_paths"):
      if key in d:
        d[key] = tuple(d[key])
    return cls(**d)


@dataclasses.dataclass
class CodeResult:
  """What one sandboxed run produced. `error` is a short message meant for the model to read."""
  ok: bool
  stdout: str
  stderr: str
  output_image: Image.Image | None
  error: str | None
  wall_s: float
  cpu_s: float | None = None


def extract_program(text):
  """Returns the Python program in a model turn (```python ...``` inside <code>...</code>), or None.

  Text without a <code> tag is taken as a fenced block if it has one; plain text is returned as-is only by
  `CodeSandbox.run` (which treats untagged, unfenced input as the program itself).
  """
  match = _CODE_RE.search(text)
  body = match.group(1) if match else text
  fence = _FENCE_RE.search(body)
  if fence:
    return fence.group(1).strip("\n")
  if match:
    body = body.strip()
    return body or None
  return None


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


def _drain(proc, deadline, cap, send, result_fd, result_cap):
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
          chunk = os.read(key.fd, 1 << 16)
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
  return bufs[proc.stdout.fileno()].text(), bufs[proc.stderr.fileno()].text(), bytes(result), timed_out


def _kill_group(proc):
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except ProcessLookupError:
    pass


def load_output_image(data, max_pixels, max_side, observe_pixels=None):
  """Decodes untrusted image bytes into an RGB PIL image (the sandbox's own rules, see sandbox_init.decode_image);
  raises ValueError with a model-readable reason. The sandbox itself decodes inside, never on the host."""
  return sandbox_init.decode_image(data, max_pixels, max_side, observe_pixels)


def _parse_result(raw, max_pixels):
  """(header dict or None, image or None) from the result pipe's bytes: one JSON line, then raw RGB pixels."""
  line, _, pixels = raw.partition(b"\n")
  try:
    header = json.loads(line)
  except ValueError:
    return None, None
  if not isinstance(header, dict):
    return None, None
  if header.get("output") != "ok":
    return header, None
  w, h = header.get("width"), header.get("height")
  if not (isinstance(w, int) and isinstance(h, int) and 1 <= w and 1 <= h and w * h <= max_pixels
          and len(pixels) == 3 * w * h):
    return {**header, "output": "decode_failed"}, None
  return header, Image.frombytes("RGB", (w, h), pixels)


def detect_isolation(preference="auto", config=None):
  """The mechanism ('bwrap' or 'unshare') whose real sandbox command line starts Python here, for `config`
  (a dict of SandboxConfig keys); raises ValueError for an unknown preference, RuntimeError when none works."""
  launch.candidates(preference)
  sandbox = CodeSandbox({**dict(config or {}), "isolation": preference, "prewarm": False, "max_concurrency": 1})
  sandbox.close()
  return sandbox.isolation


class CodeSandbox:
  """Runs untrusted Python programs, one fresh isolated process tree per call; thread-safe.

  Attributes:
    isolation: 'bwrap' or 'unshare', whichever started Python here (also logged at construction).
    cgroups: the per-slot cgroups capping each call's total memory, or None (rlimit-only mode, with a WARNING).
    slot_uids: the unprivileged uid of each slot (None unless the trainer runs as root); unique on the host.
    rlimits: the per-process limits the programs get.
  """

  def __init__(self, config=None):
    self.config = c = config if isinstance(config, SandboxConfig) else SandboxConfig.from_dict(config)
    if not 1 <= c.max_concurrency <= launch.UID_BLOCK:
      raise ValueError(f"code.max_concurrency must be in [1, {launch.UID_BLOCK}], got {c.max_concurrency}")
    if c.cgroup not in ("auto", "off"):
      raise ValueError(f"code.cgroup must be 'auto' or 'off', got {c.cgroup!r}")
    if not os.path.exists(c.python):
      raise FileNotFoundError(f"sandbox python {c.python} does not exist; set code.python")
    candidates = launch.candidates(c.isolation)
    self._root = os.geteuid() == 0
    facts = launch.interpreter_facts(os.path.abspath(c.python), tuple(c.preload))
    for name in c.preload:
      if not facts["modules"].get(name):
        log.warning("code sandbox: %s is not installed for %s; programs importing it will fail", name, c.python)
    self._modules = [name for name in c.preload if facts["modules"].get(name)]
    self._python = launch.exec_path(facts)
    self._mounts = launch.runtime_mounts(facts, c.extra_ro_paths)
    if launch.sweep_scratch(c.tmp_dir):
      log.info("code sandbox: removed scratch folders left by dead trainer processes")
    self._slots = queue.SimpleQueue()  # Bounds concurrency; as root each slot is also a distinct uid.
    for i in range(c.max_concurrency):
      self._slots.put(i)
    self.slot_uids, uid_lock = None, None
    if self._root:  # RLIMIT_NPROC counts per uid host-wide: no two sandboxes on the host share one.
      first, uid_lock = launch.claim_uid_block(c.uid_base)
      self.slot_uids = [first + i for i in range(c.max_concurrency)]
    self.cgroups = None
    if c.cgroup == "auto" and self._root:
      self.cgroups = cgroups_lib.SlotCgroups.create(
          range(c.max_concurrency), self.call_memory_mb << 20, c.max_procs + 8)
    # Warm sandboxes are started from one long-lived thread: bwrap/unshare tie their lifetime to the thread
    # that forked them (PR_SET_PDEATHSIG), so they must not be forked from short-lived caller threads.
    self._spawner = (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sandbox-spawn")
                     if c.prewarm else None)
    self._warm = {}  # slot -> Future[_Started]: a started sandbox waiting for its one program.
    self._close = weakref.finalize(self, _shutdown, self._spawner, self._warm, self.cgroups, uid_lock)
    self._launcher = self._first_that_starts(candidates)
    self.isolation, self.rlimits = self._launcher.isolation, self._launcher.rlimits
    for slot in range(c.max_concurrency if self._spawner else 0):
      self._warm[slot] = self._spawner.submit(self._launcher.start, slot, True)
    if self.cgroups is None:
      log.warning("code sandbox: no per-call memory cgroup (%s); rlimit-only mode: at most %d tasks (processes "
                  "and threads) of %d MiB each per call", "not root" if not self._root else "cgroups unusable",
                  self.rlimits["RLIMIT_NPROC"] - self._launcher.own_tasks, self.rlimits["RLIMIT_AS"] >> 20)
    log.info("code sandbox: isolation=%s, python %s, %s, timeout %.1fs, memory %d MiB per process, %s, %d slots%s",
             self.isolation, self._python,
             "per-slot unprivileged uids" if self._root else "same uid (user namespace)", c.timeout_s,
             self.rlimits["RLIMIT_AS"] >> 20,
             f"cgroup v{self.cgroups.version} cap {self.call_memory_mb} MiB per call" if self.cgroups else
             "no cgroup (rlimits only)", c.max_concurrency, ", prewarmed" if self._spawner else "")

  def _first_that_starts(self, candidates):
    """The launcher of the first mechanism whose real sandbox runs Python and imports the preloaded modules."""
    failures = []
    for isolation in candidates:
      launcher = _Launcher(self.config, isolation, self._root, self._mounts, self._python, self.slot_uids,
                           self.cgroups)
      reason = launcher.check_startup(self._modules)
      if reason is None:
        return launcher
      failures.append(f"{isolation}: {reason}")
    self.close()
    raise RuntimeError(
        f"code sandbox cannot start Python {self._python} ({'; '.join(failures)}). Install bubblewrap "
        "(apt-get install bubblewrap) or allow unprivileged user namespaces for `unshare`, and make sure that "
        f"interpreter has {', '.join(self.config.preload) or 'its packages'} installed (pip install numpy "
        "opencv-python-headless pillow), or list the folders it needs in code.extra_ro_paths")

  def close(self):
    """Stops the idle warm sandboxes and removes the cgroups (also done at exit). Call after the last run."""
    self._close()

  @property
  def call_memory_mb(self):
    return self.config.call_memory_mb or self.config.memory_mb

  def run(self, code, images=None, timeout_s=None):
    """Runs `code` (a program, or a model turn with <code>```python ...```</code>) on `images`.

    Args:
      code: the program text or the model's text containing it.
      images: {file name: PIL image or encoded bytes} placed next to the program, or a single PIL image that
        becomes `path_to_input_image.jpg`.
      timeout_s: wall-clock limit for this call (default: config.timeout_s).
    Returns:
      a CodeResult; failures of the program are reported in it, never raised.
    """
    start = time.monotonic()
    program = extract_program(code) if any(tag in code for tag in _MODEL_TEXT_MARKERS) else code
    if not program:
      return CodeResult(False, "", "", None, "no program found: write <code>```python ...```</code>",
                        time.monotonic() - start)
    if isinstance(images, Image.Image):
      images = {self.config.input_name: images}
    try:
      inputs = self._check_inputs(images or {})
    except ValueError as e:
      return CodeResult(False, "", "", None, str(e), time.monotonic() - start)
    timeout = float(timeout_s if timeout_s is not None else self.config.timeout_s)
    slot = self._slots.get()
    try:
      started = self._take_warm(slot) or self._launcher.start(slot, False)
      try:
        raw = self._launcher.call(started, program, inputs, timeout)
      finally:
        if self._spawner and self._close.alive:
          self._warm[slot] = self._spawner.submit(self._launcher.start, slot, True)
    finally:
      self._slots.put(slot)
    return self._result(*raw, timeout, time.monotonic() - start)

  def _take_warm(self, slot):
    """The slot's warm sandbox if it is alive, else None (the caller starts a cold one)."""
    future = self._warm.pop(slot, None)
    if future is None:
      return None
    try:
      started = future.result(timeout=60)
    except Exception:  # pylint: disable=broad-except
      log.exception("code sandbox: starting a warm sandbox failed; starting one on demand")
      return None
    if started.proc.poll() is not None:
      _discard(started)
      return None
    return started

  def _check_inputs(self, images):
    inputs = {}
    for name, image in images.items():
      if not _NAME_RE.match(name) or name == PROGRAM_NAME:
        raise ValueError(f"input file name {name!r} is not allowed (plain names only, not {PROGRAM_NAME!r})")
      if isinstance(image, Image.Image):
        buf = io.BytesIO()
        fmt = self.config.input_format
        image.save(buf, format=fmt, **({"compress_level": 1} if fmt == "PNG" else {"quality": 95}))
        inputs[name] = buf.getvalue()
      elif isinstance(image, (bytes, bytearray)):
        inputs[name] = bytes(image)
      else:
        raise ValueError(f"input {name!r} must be a PIL image or encoded bytes, got {type(image).__name__}")
    return inputs

  def _result(self, stdout, stderr, result, image, timed_out, oom_killed, timeout, wall):
    c = self.config
    cpu = result.get("cpu_s") if result else None
    if oom_killed:
      error = f"memory limit exceeded ({self.call_memory_mb} MB for the whole call): killed by the kernel"
      return CodeResult(False, stdout, stderr, None, error, wall, cpu)
    if timed_out or (result and result.get("wall_limit")):
      error = f"timeout: the program ran longer than {timeout:g} s and was killed"
      return CodeResult(False, stdout, stderr, None, error, wall, cpu)
    if result is None:
      tail = stderr.strip().splitlines()[-1:] or ["no diagnostics"]
      return CodeResult(False, stdout, stderr, None, f"sandbox failed: {tail[0]}", wall, cpu)
    error = _exit_error(result, stderr, c)
    if error is None:
      status = result.get("output")
      if status == "invalid":
        error = str(result.get("reason"))[:300]
      elif status != "ok" and (status != "missing" or c.require_output_image):
        error = _OUTPUT_ERRORS.get(status, "output image unreadable").format(
            name=c.output_name, mb=c.max_output_mb, s=c.output_decode_s)
    ok = error is None
    return CodeResult(ok, stdout, stderr, image if ok else None, error, wall, cpu)


_OUTPUT_ERRORS = {
    "missing": "no output image: the program did not write {name}",
    "symlink": "output image rejected: {name} is a symbolic link",
    "not_regular": "output image rejected: {name} is not a regular file",
    "too_large": "output image rejected: {name} is larger than {mb} MB",
    "unreadable": "output image rejected: {name} could not be opened",
    "decode_timeout": "output image rejected: decoding {name} took longer than {s:g} s",
    "decode_failed": "output image rejected: {name} could not be decoded",
}


def _exit_error(result, stderr, config):
  sig = result.get("signal")
  if sig is not None:
    if sig == signal.SIGXCPU:
      return "cpu time limit exceeded"
    if sig == signal.SIGXFSZ:
      return f"file size limit exceeded ({config.max_file_mb} MB per file)"
    return f"the program was killed by signal {signal.Signals(sig).name}"
  code = result.get("exit_code")
  if code == 0:
    return None
  lines = [l for l in stderr.strip().splitlines() if l.strip()]
  last = lines[-1].strip() if lines else ""
  if "MemoryError" in last:
    return f"memory limit exceeded ({config.memory_mb} MB): {last}"
  if "[Errno 27]" in last:  # EFBIG: Python ignores SIGXFSZ, so RLIMIT_FSIZE surfaces as an OSError.
    return f"file size limit exceeded ({config.max_file_mb} MB per file): {last}"
  return f"exception: {last}" if last else f"the program exited with code {code}"


class _Launcher:
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
    return {"RLIMIT_AS": memory_mb * mb, "RLIMIT_NPROC": tasks + self.own_tasks, "RLIMIT_FSIZE": c.max_file_mb * mb,
            "RLIMIT_NOFILE": c.max_open_files, "RLIMIT_CORE": 0}

  def _spec(self, uid, warm):
    c = self.config
    return {
        "mode": self.isolation, "root_dir": None, "mounts": [list(m) for m in self._mounts], "uid": uid,
        "work_mb": c.work_mb, "work_inodes": c.work_inodes, "program": PROGRAM_NAME, "output_name": c.output_name,
        "max_output_bytes": c.max_output_mb << 20, "max_output_pixels": c.max_output_pixels,
        "max_output_side": c.max_output_side, "observe_pixels": c.observe_max_pixels,
        "preload": list(c.preload) if warm else [], "seccomp": c.seccomp, "rlimits": self.rlimits,
        "work_dir": self.work_dir, "env": launch.program_env(self.work_dir),
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
          lambda fd: launch.command(self.isolation, self._root, self._mounts, self.python, fd), spec,
          self.cgroups, slot)
    except BaseException:
      if scratch:
        os.rmdir(scratch)
      raise
    return _Started(proc, result_fd, scratch, slot, self.cgroups)

  def call(self, started, program, inputs, timeout):
    """Hands the program and inputs to a started sandbox, waits, cleans up. Returns (stdout, stderr, result
    header or None, image or None, timed_out, oom_killed)."""
    c = self.config
    files = {**inputs, PROGRAM_NAME: program.encode()}
    cpu = c.cpu_s if c.cpu_s is not None else timeout + 1
    go = {"inputs": [[name, len(data)] for name, data in files.items()], "cpu_s": max(1, math.ceil(cpu)),
          "wall_s": timeout, "decode_s": c.output_decode_s}
    max_pixels = c.observe_max_pixels or c.max_output_pixels
    deadline = time.monotonic() + timeout + c.output_decode_s + 2 * _INIT_GRACE_S
    try:
      oom_before = self.cgroups.oom_kills(started.slot) if self.cgroups else 0
      stdout, stderr, raw, timed_out = _drain(
          started.proc, deadline, c.stdout_cap, json.dumps(go).encode() + b"\n" + b"".join(files.values()),
          started.result_fd, sandbox_init.HEADER_CAP + 3 * max_pixels)
      oom_killed = bool(self.cgroups) and self.cgroups.oom_kills(started.slot) > oom_before
    finally:
      _discard(started)
    header, image = _parse_result(raw, max_pixels)
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
    stdout, stderr, header, _, timed_out, _ = self.call(started, program, {}, _STARTUP_TIMEOUT_S)
    if header and header.get("exit_code") == 0 and "varft-sandbox-ok" in stdout:
      _STARTED_OK.add(key)
      return None
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return (lines[-1] if lines else "timed out" if timed_out else "exited without a word")[:300]


@dataclasses.dataclass
class _Started:
  """A sandbox process waiting for (or running) its one program."""
  proc: subprocess.Popen
  result_fd: int
  scratch: str | None
  slot: int
  cgroups: cgroups_lib.SlotCgroups | None = None


def _discard(started):
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


def _shutdown(spawner, warm, cgroups, uid_lock):
  """Finalizer of a CodeSandbox: no reference to it, only to what must be cleaned up. Never blocks (it may run
  in any thread, the spawner's included, when the garbage collector finds the sandbox): a warm sandbox still
  being started is discarded by a callback once its start completes."""
  def discard(future):
    if not future.cancelled() and future.exception() is None:
      _discard(future.result())
    if cgroups:
      cgroups.close()  # Retried after each discard: a cgroup can only go once it is empty.

  if spawner:
    spawner.shutdown(wait=False, cancel_futures=True)
  for future in list(warm.values()):
    future.add_done_callback(discard)
  warm.clear()
  if cgroups:
    cgroups.close()
  if uid_lock is not None:
    os.close(uid_lock)

