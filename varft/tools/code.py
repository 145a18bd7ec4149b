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
import logging
import os
import queue
import re
import signal
import sys
import time
import weakref

from PIL import Image

from varft import tags
from varft.processing import image as image_lib
from varft.tools import cgroups as cgroups_lib
from varft.tools import sandbox_init
from varft.tools import sandbox_launch as launch
from varft.tools import sandbox_process as process

log = logging.getLogger(__name__)

PROGRAM_NAME = process.PROGRAM_NAME
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
# Else the text is the program.
_MODEL_TEXT_MARKERS = (*map(tags.open_tag, (tags.CODE, tags.THINK, tags.ANSWER, tags.SEARCH)), tags.FENCE)


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
  # Output images are downscaled to this (what the model sees); 0: keep size.
  observe_max_pixels: int = image_lib.PAPER_MAX_PIXELS
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
  max_concurrency: int = 4
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
  match = tags.UNCLOSED_CODE_RE.search(text)
  body = match.group(1) if match else text
  fence = tags.FENCE_RE.search(body)
  if fence:
    return fence.group(1).strip("\n")
  if match:
    body = body.strip()
    return body or None
  return None


# The released MAT-Coding eval's crop override: the question's box `[x_min, y_min, x_max, y_max]` (0-1000 scale)
# and any 2-D slice `[a:b, c:d]` of the program, each bound a lazy run of text without `[`, `]`, `:` that may hold
# one flat bracketed group (`img.shape[0]`).
_BOX_RE = re.compile(r"\[\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*\]")
_BOUND = r"(?:[^\[\]:]|\[[^\[\]]*\])+?"
_SLICE_RE = re.compile(rf"\[\s*{_BOUND}\s*:\s*{_BOUND}\s*,\s*{_BOUND}\s*:\s*{_BOUND}\s*\]")


def question_box(question):
  """The first integer box `[x_min, y_min, x_max, y_max]` written in a question (0-1000 scale), or None."""
  match = _BOX_RE.search(question)
  return tuple(int(v) for v in match.groups()) if match else None


def override_crop(program, box, width, height):
  """The program with every `[a:b, c:d]` slice replaced by the box in pixels of a width x height input image,
  `[y_min:y_max, x_min:x_max]` (each `int(v / 1000 * side)`), as the released MAT-Coding eval does for crop
  steps; returns (program, number of slices replaced)."""
  x_min, y_min = int(box[0] / 1000 * width), int(box[1] / 1000 * height)
  x_max, y_max = int(box[2] / 1000 * width), int(box[3] / 1000 * height)
  return _SLICE_RE.subn(f"[{y_min}:{y_max}, {x_min}:{x_max}]", program)


def load_output_image(data, max_pixels, max_side, observe_pixels=None):
  """Decodes untrusted image bytes into an RGB PIL image (the sandbox's own rules, see sandbox_init.decode_image);
  raises ValueError with a model-readable reason. The sandbox itself decodes inside, never on the host."""
  return sandbox_init.decode_image(data, max_pixels, max_side, observe_pixels)


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
    if not c.output_decode_s > 0 or c.observe_max_pixels < 0:
      raise ValueError(f"code.output_decode_s must be > 0 and code.observe_max_pixels >= 0, got "
                       f"{c.output_decode_s} and {c.observe_max_pixels}")
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
      self.cgroups = cgroups_lib.SlotCgroups.create(range(c.max_concurrency), self.call_memory_mb << 20,
                                                    c.max_procs + 8)
    # Warm sandboxes are started from one long-lived thread: bwrap/unshare tie their lifetime to the thread
    # that forked them (PR_SET_PDEATHSIG), so they must not be forked from short-lived caller threads.
    self._spawner = (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sandbox-spawn")
                     if c.prewarm else None)
    self._warm = {}  # slot -> Future[process.Started]: a started sandbox waiting for its one program.
    self._close = weakref.finalize(self, process.shutdown, self._spawner, self._warm, self.cgroups, uid_lock)
    self._launcher = self._first_that_starts(candidates)
    self.isolation, self.rlimits = self._launcher.isolation, self._launcher.rlimits
    for slot in range(c.max_concurrency if self._spawner else 0):
      self._warm[slot] = self._spawner.submit(self._launcher.start, slot, True)
    if self.cgroups is None:
      reason = ("not root"
                if not self._root else "cgroup='off'" if c.cgroup == "off" else "no writable memory cgroup here")
      log.warning(
          "code sandbox: no per-call memory cgroup (%s); rlimit-only mode: at most %d tasks (processes "
          "and threads) of %d MiB each per call", reason, self.rlimits["RLIMIT_NPROC"] - self._launcher.own_tasks,
          self.rlimits["RLIMIT_AS"] >> 20)
    log.info(
        "code sandbox: isolation=%s, python %s, %s, timeout %.1fs, memory %d MiB per process, %s, %d slots%s",
        self.isolation, self._python, "per-slot unprivileged uids" if self._root else "same uid (user namespace)",
        c.timeout_s, self.rlimits["RLIMIT_AS"] >> 20,
        f"cgroup v{self.cgroups.version} cap {self.call_memory_mb} MiB per call"
        if self.cgroups else "no cgroup (rlimits only)", c.max_concurrency, ", prewarmed" if self._spawner else "")

  def _first_that_starts(self, candidates):
    """The launcher of the first mechanism whose real sandbox runs Python and imports the preloaded modules."""
    failures = []
    for isolation in candidates:
      launcher = process.Launcher(self.config, isolation, self._root, self._mounts, self._python, self.slot_uids,
                                  self.cgroups)
      reason = launcher.check_startup(self._modules)
      if reason is None:
        if failures:
          log.warning("code sandbox: cannot start Python with %s; using %s", "; ".join(failures), isolation)
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
      process.discard(started)
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
        error = _OUTPUT_ERRORS.get(status, "output image unreadable").format(name=c.output_name, mb=c.max_output_mb,
                                                                             s=c.output_decode_s)
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
