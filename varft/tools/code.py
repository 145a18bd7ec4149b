"""The code tool: runs model-written Python in an isolated, throw-away sandbox.

Every call gets one fresh process tree in new mount/pid/net/ipc/uts namespaces (bubblewrap, or `unshare` when
bubblewrap is missing) that sees only a read-only Python runtime and a size-limited tmpfs holding its input image.
Inside, `sandbox_init.py` drops to an unprivileged uid (one per concurrency slot when the trainer runs as root)
with rlimits on CPU, memory, processes, file size and open files; where the host allows it, a per-slot cgroup
caps the memory of the whole call. The host kills the whole tree at the wall-clock limit, and the pid namespace
guarantees nothing outlives the call. There is no network (a fresh net namespace).

Speed: with `prewarm` (default) each idle slot holds one sandbox already started up to the point where it waits
for its program (namespaces built, numpy/cv2/PIL imported); a call takes it, runs once, and a new one is started
for the slot in the background. No process ever runs two programs.

The paper's convention: the program reads `path_to_input_image.jpg` and writes `path_to_output_image.jpg`.
"""
import concurrent.futures
import dataclasses
import functools
import io
import itertools
import json
import logging
import math
import os
import queue
import re
import selectors
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import warnings
import weakref
from importlib import util as importlib_util

from PIL import Image

from varft.tools import cgroups as cgroups_lib

log = logging.getLogger(__name__)

INIT_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_init.py")
PROGRAM_NAME = "main.py"
SPEC_NAME = "spec.json"  # The call spec for sandbox_init.py, next to the inputs (not in argv: /proc is visible).
OUTPUT_FORMATS = ("JPEG", "PNG", "BMP", "WEBP")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
_INSTANCES = itertools.count()
_MODEL_TEXT_MARKERS = ("<code>", "```", "<think>", "<answer>", "<search>")  # Else the text is the program.
_CODE_RE = re.compile(r"<code>(.*?)(?:</code>|$)", re.S)
_FENCE_RE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n?(.*?)```", re.S | re.I)


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
  max_output_pixels: int = 40_000_000
  max_output_side: int = 16384
  require_output_image: bool = True  # A program that writes no output image is an error (paper's tool).
  call_memory_mb: int | None = None  # Cgroup cap on the whole call (all processes + tmpfs); default memory_mb.
  cgroup: str = "auto"  # 'auto': use per-slot cgroups where the host allows it; 'off': rlimits only.
  isolation: str = "auto"  # 'auto' (bwrap, else unshare), 'bwrap' or 'unshare'.
  seccomp: bool = True  # Deny namespace/mount/ptrace/bpf/... syscalls to the program (x86_64 and aarch64).
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
  tmp_dir: str | None = None  # Host directory for per-call scratch dirs.

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


def _drain(proc, deadline, cap):
  """Reads stdout/stderr (capped) until EOF or the deadline; kills the process group at the deadline."""
  bufs = {proc.stdout: _Capped(cap), proc.stderr: _Capped(cap)}
  timed_out = False
  with selectors.DefaultSelector() as sel:
    for f in bufs:
      os.set_blocking(f.fileno(), False)
      sel.register(f, selectors.EVENT_READ)
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
        try:
          chunk = os.read(key.fd, 1 << 16)
        except BlockingIOError:
          continue
        if chunk:
          bufs[key.fileobj].add(chunk)
        else:
          sel.unregister(key.fileobj)
  try:
    proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
  except subprocess.TimeoutExpired:
    timed_out = True
    _kill_group(proc)
    proc.wait()
  return bufs[proc.stdout].text(), bufs[proc.stderr].text(), timed_out


def _kill_group(proc):
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except ProcessLookupError:
    pass


def load_output_image(data, max_pixels, max_side):
  """Decodes untrusted image bytes into an RGB PIL image; raises ValueError with a model-readable reason."""
  try:
    image = Image.open(io.BytesIO(data))
  except Image.DecompressionBombError:
    raise ValueError("output image is too large (its header claims a decompression bomb)") from None
  except (OSError, SyntaxError, ValueError) as e:
    raise ValueError(f"output image is not a readable image file ({type(e).__name__})") from None
  if image.format not in OUTPUT_FORMATS:
    raise ValueError(f"output image format {image.format} not supported; write JPEG or PNG")
  w, h = image.size
  if w < 1 or h < 1 or w > max_side or h > max_side or w * h > max_pixels:
    raise ValueError(f"output image is too large: {w}x{h} (max {max_side} per side, {max_pixels} pixels)")
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      image.load()
  except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombWarning,
          Image.DecompressionBombError) as e:
    raise ValueError(f"output image is corrupt or truncated ({type(e).__name__})") from None
  return image.convert("RGB")


def _existing(path):
  return path if os.path.lexists(path) else None


def runtime_mounts(config):
  """The read-only view of the host the sandbox gets: (op, source, target) tuples, op in ro-bind/symlink."""
  ops = []
  for top in ("/lib", "/lib64", "/lib32", "/libx32"):
    if os.path.islink(top):
      ops.append(("symlink", os.readlink(top), top))
    elif os.path.isdir(top):
      ops.append(("ro-bind", top, top))
  paths = ["/usr/lib", "/usr/lib64", "/usr/lib32", "/etc/ld.so.cache"]
  exe = os.path.realpath(config.python)
  paths.append(exe)
  for scheme_paths in (sysconfig.get_paths(), sysconfig.get_paths(vars={"base": sys.base_prefix})):
    paths += [scheme_paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")]
  libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
  if libdir and soname:
    paths.append(os.path.join(libdir, soname))
  if sys.prefix != sys.base_prefix:  # A venv: its pyvenv.cfg and bin/python must be visible too.
    paths.append(sys.prefix)
  for name in config.preload:
    spec = importlib_util.find_spec(name.split(".")[0])
    if spec and spec.submodule_search_locations:
      paths.append(os.path.dirname(list(spec.submodule_search_locations)[0]))
  paths += list(config.extra_ro_paths)
  chosen = []
  for p in sorted({os.path.realpath(p) for p in paths if p and _existing(p)}, key=len):
    if not any(p == c or p.startswith(c.rstrip("/") + "/") for c in chosen):
      chosen.append(p)
  ops += [("ro-bind", p, p) for p in sorted(chosen)]
  return ops


def sandbox_python(config):
  """The interpreter path to exec inside the sandbox: a venv's own bin/python (bound with the venv), else the
  resolved interpreter (the bound file itself, symlinks such as bin/python -> python3.11 are not recreated)."""
  in_venv = sys.prefix != sys.base_prefix and os.path.abspath(config.python).startswith(sys.prefix + "/")
  return os.path.abspath(config.python) if in_venv else os.path.realpath(config.python)


def _probe(cmd):
  try:
    return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=20).returncode == 0
  except (OSError, subprocess.TimeoutExpired):
    return False


@functools.lru_cache(maxsize=None)
def detect_isolation(preference="auto"):
  """Picks the isolation mechanism: 'bwrap' when bubblewrap works here, else 'unshare'; raises if neither."""
  if preference not in ("auto", "bwrap", "unshare"):
    raise ValueError(f"sandbox isolation must be 'auto', 'bwrap' or 'unshare', got {preference!r}")
  root = os.geteuid() == 0
  userns = [] if root else ["--unshare-user"]
  if preference in ("auto", "bwrap") and shutil.which("bwrap"):
    if _probe(["bwrap", *userns, "--ro-bind", "/", "/", "--unshare-net", "--unshare-pid", "--", "true"]):
      return "bwrap"
  if preference == "bwrap":
    raise RuntimeError("bubblewrap is not usable here: install it (apt-get install bubblewrap) or set "
                       "isolation='auto' to fall back to unshare")
  userns = [] if root else ["--user", "--map-root-user"]
  if shutil.which("unshare") and _probe(["unshare", *userns, "--mount", "--net", "--pid", "--fork", "true"]):
    return "unshare"
  raise RuntimeError("no code sandbox is available: install bubblewrap (apt-get install bubblewrap), or allow "
                     "unprivileged user namespaces for the util-linux `unshare` fallback")


class CodeSandbox:
  """Runs untrusted Python programs, one fresh isolated process tree per call; thread-safe.

  Attributes:
    isolation: 'bwrap' or 'unshare', whichever is active (also logged at construction).
    cgroups: the per-slot cgroups capping each call's total memory, or None (rlimits only).
    slot_uids: the unprivileged uid of each slot (None unless the trainer runs as root).
  """

  def __init__(self, config=None):
    self.config = config if isinstance(config, SandboxConfig) else SandboxConfig.from_dict(config)
    if not 1 <= self.config.max_concurrency <= 256:
      raise ValueError(f"code.max_concurrency must be in [1, 256], got {self.config.max_concurrency}")
    if not os.path.exists(self.config.python):
      raise FileNotFoundError(f"sandbox python {self.config.python} does not exist; set code.python")
    self.isolation = detect_isolation(self.config.isolation)
    self._root = os.geteuid() == 0
    self._mounts = runtime_mounts(self.config)
    self._slots = queue.SimpleQueue()  # Bounds concurrency; as root each slot is also a distinct uid.
    for i in range(self.config.max_concurrency):
      self._slots.put(i)
    # Distinct uids per slot *and* per sandbox instance/process (RLIMIT_NPROC counts per uid system-wide, so
    # several trainer processes on one host must not share them).
    block = ((os.getpid() << 4) | (next(_INSTANCES) & 15)) % (1 << 22)
    self.slot_uids = ([self.config.uid_base + block * self.config.max_concurrency + i
                       for i in range(self.config.max_concurrency)] if self._root else None)
    if self.config.cgroup not in ("auto", "off"):
      raise ValueError(f"code.cgroup must be 'auto' or 'off', got {self.config.cgroup!r}")
    self.cgroups = None
    if self.config.cgroup == "auto" and self._root:
      self.cgroups = cgroups_lib.SlotCgroups.create(
          range(self.config.max_concurrency), self.call_memory_mb << 20, self.config.max_procs + 8)
    # Warm sandboxes are started from one long-lived thread: bwrap/unshare tie their lifetime to the thread
    # that forked them (PR_SET_PDEATHSIG), so they must not be forked from short-lived caller threads.
    self._spawner = (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sandbox-spawn")
                     if self.config.prewarm else None)
    self._launcher = _Launcher(self.config, self.isolation, self._root, self._mounts, self.slot_uids, self.cgroups)
    self._warm = {}  # slot -> Future[_Started]: a started sandbox waiting for its one program.
    self._close = weakref.finalize(self, _shutdown, self._spawner, self._warm, self.cgroups)
    for slot in range(self.config.max_concurrency if self._spawner else 0):
      self._warm[slot] = self._spawner.submit(self._launcher.start, slot, True)
    log.info("code sandbox: isolation=%s, %s, timeout %.1fs, memory %d MiB per process, %s, %d slots%s",
             self.isolation, "per-slot unprivileged uids" if self._root else "same uid (user namespace)",
             self.config.timeout_s, self.config.memory_mb,
             f"cgroup v{self.cgroups.version} cap {self.call_memory_mb} MiB per call" if self.cgroups else
             "no cgroup (rlimits only)", self.config.max_concurrency, ", prewarmed" if self._spawner else "")

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
        return self._call(started, program, inputs, timeout, start)
      finally:
        if self._spawner and self._close.alive:
          self._warm[slot] = self._spawner.submit(self._launcher.start, slot, True)
    finally:
      self._slots.put(slot)

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
      if not _NAME_RE.match(name) or name in (PROGRAM_NAME, SPEC_NAME):
        raise ValueError(f"input file name {name!r} is not allowed (plain names only, not {PROGRAM_NAME!r} or "
                         f"{SPEC_NAME!r})")
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

  def _call(self, started, program, inputs, timeout, start):
    """Hands the program to a started sandbox, waits (up to `timeout`), collects and cleans up."""
    c = self.config
    proc, slot = started.proc, started.slot
    in_dir, out_dir = os.path.join(started.call_dir, "in"), os.path.join(started.call_dir, "out")
    try:
      for name, data in {**inputs, PROGRAM_NAME: program.encode()}.items():
        with open(os.path.join(in_dir, name), "wb") as f:
          f.write(data)
      oom_before = self.cgroups.oom_kills(slot) if self.cgroups else 0
      cpu = c.cpu_s if c.cpu_s is not None else timeout + 1
      go = {"inputs": sorted([*inputs, PROGRAM_NAME]), "cpu_s": max(1, math.ceil(cpu)),
            "wall_s": timeout + _INIT_GRACE_S}
      try:
        proc.stdin.write(json.dumps(go).encode() + b"\n")
        proc.stdin.close()
      except BrokenPipeError:
        pass  # It died while waiting; reported below as a sandbox failure with its stderr.
      with proc:
        stdout, stderr, timed_out = _drain(proc, time.monotonic() + timeout, c.stdout_cap)
      wall = time.monotonic() - start
      oom_killed = bool(self.cgroups) and self.cgroups.oom_kills(slot) > oom_before
      result = _read_json(os.path.join(out_dir, "result.json"))
      output_path = os.path.join(out_dir, "output.bin")
      output_data = None
      if result and result.get("output") == "ok" and os.path.getsize(output_path) <= c.max_output_mb << 20:
        with open(output_path, "rb") as f:
          output_data = f.read()
    finally:
      _discard(started)
    return self._result(stdout, stderr, timed_out, oom_killed, timeout, result, output_data, wall)

  def _result(self, stdout, stderr, timed_out, oom_killed, timeout, result, output_data, wall):
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
    image = None
    if error is None:
      status = result.get("output")
      if status == "ok":
        try:
          image = load_output_image(output_data, c.max_output_pixels, c.max_output_side)
        except ValueError as e:
          error = str(e)
      elif status != "missing" or c.require_output_image:
        error = _OUTPUT_ERRORS.get(status, "output image unreadable").format(name=c.output_name,
                                                                             mb=c.max_output_mb)
    return CodeResult(error is None, stdout, stderr, image, error, wall, cpu)


_INIT_GRACE_S = 1.0  # The init's own wall-clock kill comes this long after the host's (a backstop).

_INIT_CAPS = ("CAP_SYS_ADMIN", "CAP_SETUID", "CAP_SETGID", "CAP_KILL", "CAP_CHOWN", "CAP_DAC_OVERRIDE",
              "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_SYS_CHROOT", "CAP_SETPCAP")

_OUTPUT_ERRORS = {
    "missing": "no output image: the program did not write {name}",
    "symlink": "output image rejected: {name} is a symbolic link",
    "not_regular": "output image rejected: {name} is not a regular file",
    "too_large": "output image rejected: {name} is larger than {mb} MB",
    "unreadable": "output image rejected: {name} could not be opened",
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


def _ancestors(paths):
  """All proper ancestor directories of absolute paths, parents first ("/" excluded)."""
  found = set()
  for path in paths:
    parent = os.path.dirname(path)
    while parent not in ("/", ""):
      found.add(parent)
      parent = os.path.dirname(parent)
  return sorted(found, key=lambda p: (p.count("/"), p))


class _Launcher:
  """Starts sandbox processes. Holds no reference to its CodeSandbox, so the warm-up thread never keeps one
  alive (and never runs its finalizer)."""

  def __init__(self, config, isolation, root, mounts, slot_uids, cgroups):
    self.config, self.isolation, self._root = config, isolation, root
    self._mounts, self.slot_uids, self.cgroups = mounts, slot_uids, cgroups

  def _spec(self, mode, uid, root_dir, warm):
    c = self.config
    mb = 1 << 20
    return {
        "mode": mode,
        "root_dir": root_dir,
        "mounts": [list(m) for m in self._mounts],
        "uid": uid,
        "work_mb": c.work_mb,
        "work_inodes": c.work_inodes,
        "program": PROGRAM_NAME,
        "output_name": c.output_name,
        "max_output_bytes": c.max_output_mb * mb,
        "preload": list(c.preload) if warm else [],
        "seccomp": c.seccomp,
        "rlimits": {
            "RLIMIT_AS": c.memory_mb * mb,
            "RLIMIT_NPROC": c.max_procs,
            "RLIMIT_FSIZE": c.max_file_mb * mb,
            "RLIMIT_NOFILE": c.max_open_files,
            "RLIMIT_CORE": 0,
        },
        "env": _program_env(),
    }

  def _command(self, call_dir):
    in_dir, out_dir = os.path.join(call_dir, "in"), os.path.join(call_dir, "out")
    py = [sandbox_python(self.config), "-I", "-B"]
    if self.isolation == "bwrap":
      cmd = ["bwrap", "--die-with-parent", "--new-session", "--as-pid-1", "--unshare-ipc", "--unshare-pid", "--unshare-net",
             "--unshare-uts", "--unshare-cgroup-try", "--hostname", "sandbox"]
      if not self._root:
        cmd.append("--unshare-user")
      cmd += ["--cap-drop", "ALL"]
      for cap in _INIT_CAPS:
        cmd += ["--cap-add", cap]
      for parent in _ancestors(dst for _, _, dst in self._mounts):  # bwrap would create them 0700.
        cmd += ["--perms", "0755", "--dir", parent]
      for op, src, dst in self._mounts:
        cmd += ["--symlink", src, dst] if op == "symlink" else [f"--{op}", src, dst]
      cmd += ["--dev", "/dev", "--proc", "/proc", "--ro-bind", in_dir, "/in", "--bind", out_dir, "/out",
              "--ro-bind", INIT_SCRIPT, "/init.py", "--dir", "/work", "--chdir", "/", "--"]
      return cmd + py + ["/init.py", "/in/" + SPEC_NAME]
    cmd = ["unshare", "--mount", "--net", "--pid", "--ipc", "--uts", "--fork", "--kill-child",
           "--propagation", "private"]
    if not self._root:
      cmd += ["--user", "--map-root-user"]
    return cmd + py + [INIT_SCRIPT, os.path.join(in_dir, SPEC_NAME)]

  def start(self, slot, warm):
    """Starts a sandbox for `slot` up to the point where it waits for its program (on stdin); a `warm` one
    (started ahead of its call) also pre-imports config.preload while it waits."""
    c = self.config
    call_dir = tempfile.mkdtemp(prefix="varft-sandbox-", dir=c.tmp_dir)
    try:
      in_dir, out_dir = os.path.join(call_dir, "in"), os.path.join(call_dir, "out")
      os.mkdir(in_dir, 0o700)
      os.mkdir(out_dir, 0o700)
      root_dir = None
      spec = self._spec(self.isolation, self.slot_uids[slot] if self._root else None, None, warm)
      if self.isolation == "unshare":
        root_dir = os.path.join(call_dir, "root")
        os.mkdir(root_dir, 0o700)
        spec["root_dir"] = root_dir
        spec["mounts"] += _unshare_extra_mounts(in_dir, out_dir)
      with open(os.path.join(in_dir, SPEC_NAME), "w") as f:
        json.dump(spec, f)
      cmd = self._command(call_dir)
      if self.cgroups:
        cmd = self.cgroups.wrap(slot, cmd)
      proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=_init_env(), start_new_session=True)
    except BaseException:
      shutil.rmtree(call_dir, ignore_errors=True)
      raise
    return _Started(proc, call_dir, slot, self.cgroups)


@dataclasses.dataclass
class _Started:
  """A sandbox process waiting for (or running) its one program."""
  proc: subprocess.Popen
  call_dir: str
  slot: int
  cgroups: cgroups_lib.SlotCgroups | None = None


def _discard(started):
  """Kills what is left of a sandbox process tree and removes its host directory."""
  if started.proc.poll() is None:
    _kill_group(started.proc)
  for f in (started.proc.stdin, started.proc.stdout, started.proc.stderr):
    if f:
      f.close()
  started.proc.wait()
  if started.cgroups:
    started.cgroups.kill_all(started.slot)  # Belt and braces: the pid namespace is already going down.
  shutil.rmtree(started.call_dir, ignore_errors=True)


def _shutdown(spawner, warm, cgroups):
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


def _read_json(path):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _unshare_extra_mounts(in_dir, out_dir):
  devices = [("dev-bind", f"/dev/{d}", f"/dev/{d}") for d in ("null", "zero", "random", "urandom")]
  return devices + [("ro-bind", in_dir, "/in"), ("bind", out_dir, "/out"), ("dir", "", "/work")]


def _program_env():
  return {"HOME": "/work", "TMPDIR": "/work", "LANG": "C.UTF-8", "PATH": "/usr/bin:/bin", **_THREAD_ENV}


_THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _init_env():
  return {"LANG": "C.UTF-8", "PATH": os.environ.get("PATH", "/usr/bin:/bin"), **_THREAD_ENV}
