"""In-sandbox init for one code-tool call: pid 1 of the sandbox's pid namespace, trusted, with the sandbox's root
privileges. Not read from the host's file system inside the sandbox: the host starts `python -I -B -c BOOT <n>
<result fd>`, BOOT reads this file's text (n bytes) from stdin and runs it, so no checkout path is mounted. Then:
  1. it reads the call spec (one JSON line on stdin); in unshare mode it builds the sandbox root itself: a tmpfs
     with read-only binds of the Python runtime, and chroots into it (bubblewrap does this part in bwrap mode);
  2. mounts a size-limited tmpfs at the work dir (/work unless the runtime lives there) and pre-imports the
     configured modules (numpy, cv2, ...);
  3. waits for the call on stdin (a warm sandbox waits here, started ahead of its call): a JSON line naming the
     inputs and their sizes, then their bytes, which it writes into the work dir (there is no host folder to share);
  4. forks the program's process, confined (see `_confine`), and kills its whole tree at the wall-clock limit;
  5. forks an equally confined decoder that opens the output image without following links (regular files only,
     size-capped), decodes it under its own clock and downscales it to what the model will see;
  6. the decoder writes the raw RGB pixels to the result pipe; the init then adds its own JSON trailer (exit
     status, output status, image size) and the trailer's length.
The host reads only that pipe and the program's stdout/stderr, each with a size cap.

`decode_image` is also imported by the host (`varft.tools.code.load_output_image`): one set of validation rules.
"""
import ctypes
import io
import json
import math
import os
import resource
import signal
import stat
import sys
import warnings

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 38, 24, 47, 4
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
OUTPUT_FORMATS = ("JPEG", "PNG", "BMP", "WEBP")
HEADER_CAP = 1 << 16  # Bytes of the decoder's header line and of the init's trailer.

_libc = ctypes.CDLL(None, use_errno=True)


def _mount(source, target, fstype, flags, data=None):
  enc = lambda s: None if s is None else s.encode()
  if _libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
    err = ctypes.get_errno()
    raise OSError(err, f"mount {source} -> {target}: {os.strerror(err)}")


def _build_root(spec):
  """unshare mode: assemble the sandbox root from the host-computed mount plan, then chroot into it."""
  root = spec["root_dir"]
  _mount(None, "/", None, MS_REC | MS_PRIVATE)
  _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
  for op, src, dst in spec["mounts"]:
    target = root + dst
    if op == "symlink":
      os.makedirs(os.path.dirname(target), exist_ok=True)
      os.symlink(src, target)
      continue
    if op == "dir":
      os.makedirs(target, exist_ok=True)
      continue
    if os.path.isdir(src):
      os.makedirs(target, exist_ok=True)
    else:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      open(target, "a").close()
    _mount(src, target, None, MS_BIND | MS_REC)
    if op == "ro-bind":
      _mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_REC)
  os.makedirs(root + "/proc", exist_ok=True)
  _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
  _mount(None, root, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)  # Writable: the work dir only.
  os.chroot(root)
  os.chdir("/")


def _owner(spec):
  return spec["uid"] if spec["uid"] is not None else os.getuid()


def _mount_work(spec):
  uid = _owner(spec)
  opts = f"size={spec['work_mb']}m,nr_inodes={spec['work_inodes']},mode=0700,uid={uid},gid={uid}"
  os.makedirs(spec["work_dir"], exist_ok=True)
  _mount("tmpfs", spec["work_dir"], "tmpfs", MS_NOSUID | MS_NODEV, opts)


def _write_inputs(spec, inputs, stdin):
  """Copies each (name, size) input from stdin into the work dir, owned by the program's uid."""
  uid = _owner(spec)
  for name, size in inputs:
    if "/" in name or name in (".", ".."):
      raise ValueError(f"bad input name {name!r}")
    data = stdin.read(size)
    if len(data) != size:
      raise EOFError(f"input {name} truncated")
    path = os.path.join(spec["work_dir"], name)
    with open(path, "wb") as f:
      f.write(data)
    os.chown(path, uid, uid)


def _drop_capabilities():
  """Empties the capability sets (needed when no uid switch happens, i.e. inside a user namespace)."""
  header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
  data = (ctypes.c_uint32 * 6)()
  if _libc.capset(header, data) != 0:
    raise OSError(ctypes.get_errno(), "capset failed")
  _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)


# seccomp: a denylist on top of the dropped capabilities, closing kernel attack surface that an unprivileged
# process still has: new namespaces (user namespaces would hand it capabilities again), mounts, ptrace, bpf,
# perf, userfaultfd, keyrings, io_uring, module loading. clone3 gets ENOSYS (its flags live in memory a filter
# cannot read), which makes libc fall back to clone, whose flags are checked. Sockets: an allow-list of families,
# AF_UNIX stream/seqpacket only (no network families, no vsock, no netlink; no datagrams, which could be sent to
# a path), and connect() is refused, so no socket file reachable through a read-only mount can be reached.
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_SYSCALLS = {  # name: (x86_64, aarch64)
    "unshare": (272, 97), "setns": (308, 268), "mount": (165, 40), "umount2": (166, 39),
    "pivot_root": (155, 41), "chroot": (161, 51), "ptrace": (101, 117), "bpf": (321, 280),
    "perf_event_open": (298, 241), "userfaultfd": (323, 282), "keyctl": (250, 219), "add_key": (248, 217),
    "request_key": (249, 218), "kexec_load": (246, 104), "kexec_file_load": (320, 294),
    "init_module": (175, 105), "finit_module": (313, 273), "delete_module": (176, 106),
    "io_uring_setup": (425, 425), "open_by_handle_at": (304, 265), "fsopen": (430, 430),
    "fsmount": (432, 432), "move_mount": (429, 429), "open_tree": (428, 428), "fspick": (433, 433),
    "mount_setattr": (442, 442),
}
_SOCKET_CALLS = {"socket": (41, 198), "socketpair": (53, 199)}
_NR_CONNECT = (42, 203)
# Signals aimed at pid 1, the init (which in a user namespace has the program's uid, so kill() alone would be let
# through): kill, tkill, tgkill, rt_sigqueueinfo, rt_tgsigqueueinfo, and pidfd_open for pidfd_send_signal.
_SIGNAL_CALLS = ((62, 129), (200, 130), (234, 131), (129, 138), (297, 240), (434, 434))
_NR_CLONE, _NR_CLONE3 = {"x86_64": 56, "aarch64": 220}, 435
_CLONE_NEW_FLAGS = 0x7E020000  # NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET
_EPERM, _EACCES, _ENOSYS, _EAFNOSUPPORT = 1, 13, 38, 97
_AF_UNIX, _SOCK_STREAM, _SOCK_SEQPACKET, _SOCK_TYPE_MASK = 1, 1, 5, 0xF


class _SockFilter(ctypes.Structure):
  _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]


class _SockFprog(ctypes.Structure):
  _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def _seccomp_program(machine):
  """The BPF program as (code, jt, jf, k) tuples. Each check is `if nr == X: <body ending in a return>`."""
  ld, jeq, jset, alu_and, ret = 0x20, 0x15, 0x45, 0x54, 0x06
  allow, kill, errno = 0x7FFF0000, 0x80000000, 0x00050000
  arg0, arg1 = 16, 24  # Offsets of the low 32 bits of the first two syscall arguments (little-endian).
  col = 0 if machine == "x86_64" else 1
  prog = [(ld, 0, 0, 4), (jeq, 1, 0, _AUDIT_ARCH[machine]), (ret, 0, 0, kill), (ld, 0, 0, 0)]

  def when(nr, body):
    prog.append((jeq, 0, len(body), nr))
    prog.extend(body)

  if machine == "x86_64":  # The x32 ABI aliases every syscall above 0x40000000: refuse it wholesale.
    prog += [(jset, 0, 1, 0x40000000), (ret, 0, 0, errno | _EPERM)]
  when(_NR_CLONE3, [(ret, 0, 0, errno | _ENOSYS)])
  for numbers in _SYSCALLS.values():
    when(numbers[col], [(ret, 0, 0, errno | _EPERM)])
  for numbers in _SOCKET_CALLS.values():
    when(numbers[col], [(ld, 0, 0, arg0), (jeq, 1, 0, _AF_UNIX), (ret, 0, 0, errno | _EAFNOSUPPORT), (ld, 0, 0, arg1),
                        (alu_and, 0, 0, _SOCK_TYPE_MASK), (jeq, 2, 0, _SOCK_STREAM), (jeq, 1, 0, _SOCK_SEQPACKET),
                        (ret, 0, 0, errno | _EPERM), (ret, 0, 0, allow)])
  when(_NR_CONNECT[col], [(ret, 0, 0, errno | _EACCES)])
  for numbers in _SIGNAL_CALLS:
    when(numbers[col], [(ld, 0, 0, arg0), (jeq, 0, 1, 1), (ret, 0, 0, errno | _EPERM), (ret, 0, 0, allow)])
  when(_NR_CLONE[machine], [(ld, 0, 0, arg0), (jset, 0, 1, _CLONE_NEW_FLAGS), (ret, 0, 0, errno | _EPERM),
                            (ret, 0, 0, allow)])
  prog.append((ret, 0, 0, allow))
  return prog


def _install_seccomp():
  """Installs the filter (needs no_new_privs). Returns False on an architecture it does not know."""
  machine = os.uname().machine
  if machine not in _AUDIT_ARCH:
    return False
  prog = _seccomp_program(machine)
  filters = (_SockFilter * len(prog))(*[_SockFilter(*ins) for ins in prog])
  fprog = _SockFprog(len(prog), filters)
  if _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
    raise OSError(ctypes.get_errno(), "seccomp filter not installed")
  return True


def _preload(modules):
  for name in modules:
    try:
      __import__(name)
    except Exception:  # noqa: BLE001 (the program will see the same import error itself, with its traceback)
      pass


def _confine(spec, limits, keep=None):
  """Turns this (forked) process into an unprivileged one: fds 3+ closed (but `keep`), its own session, rlimits,
  no capabilities (bounding set included), the slot's uid, no_new_privs, seccomp; cwd the work dir and the
  program's environment."""
  if keep is None:
    os.closerange(3, 1 << 16)
  else:
    os.closerange(3, keep)
    os.closerange(keep + 1, 1 << 16)
  os.setsid()  # Its own process group: kill(0, ...) never reaches the init.
  for name, value in limits.items():
    resource.setrlimit(getattr(resource, name), (value, value))
  for cap in range(64):  # The bounding set: nothing can ever be regained (fails harmlessly past the last cap).
    _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
  if spec["uid"] is not None:
    os.setgroups([])
    os.setgid(spec["uid"])
    os.setuid(spec["uid"])
  _drop_capabilities()
  if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
    raise OSError(ctypes.get_errno(), "no_new_privs not set")
  if spec["seccomp"]:
    _install_seccomp()
  os.chdir(spec["work_dir"])
  os.environ.clear()
  os.environ.update(spec["env"])


def _run_program(spec, limits):
  """Child: become the unprivileged program process. Never returns."""
  code = 1
  try:
    _confine(spec, limits)
    sys.argv = [spec["program"]]
    sys.path.insert(0, spec["work_dir"])
    import runpy  # pylint: disable=g-import-not-at-top
    runpy.run_path(spec["program"], run_name="__main__")
    code = 0
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if not isinstance(e.code, (int, type(None))):
      print(e.code, file=sys.stderr)
  except BaseException as e:  # noqa: BLE001 (the program's own error: reported, exit code 1)
    code = 1
    try:
      import traceback  # pylint: disable=g-import-not-at-top
      traceback.print_exc()
    except BaseException:  # noqa: BLE001 (the traceback module itself failed)
      os.write(2, f"{type(e).__name__}: {e}\n".encode())
  finally:
    try:
      sys.stdout.flush()
      sys.stderr.flush()
    finally:
      os._exit(code)


def _reap_everything():
  """Kill every process of this pid namespace but the init (daemons, fork bombs), then reap them."""
  try:
    os.kill(-1, signal.SIGKILL)
  except ProcessLookupError:
    return
  for _ in range(1 << 16):
    try:
      os.waitpid(-1, 0)
    except ChildProcessError:
      return


def _fork_timed(seconds, child):
  """Forks `child()` (which never returns) and arms the clock: past `seconds` the whole namespace but the init is
  killed. Returns (pid, expired) where `expired` is a list that becomes non-empty when the clock ran out."""
  pid = os.fork()
  if pid == 0:
    child()
  expired = []

  def on_alarm(signum, frame):  # pylint: disable=unused-argument
    expired.append(True)
    os.kill(-1, signal.SIGKILL)

  signal.signal(signal.SIGALRM, on_alarm)
  signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
  return pid, expired


def decode_image(data, max_pixels, max_side, observe_pixels=None):
  """Decodes untrusted image bytes into an RGB PIL image, downscaled to at most `observe_pixels` pixels (aspect
  kept); raises ValueError with a model-readable reason."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
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
  size = (w, h)
  if observe_pixels and w * h > observe_pixels:
    scale = math.sqrt(observe_pixels / (w * h))
    size = (max(1, int(w * scale)), max(1, int(h * scale)))
    if image.format == "JPEG":
      image.draft("RGB", size)  # Decode at 1/2, 1/4 or 1/8 scale where that still covers `size`.
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      image.load()
  except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombWarning,
          Image.DecompressionBombError) as e:
    raise ValueError(f"output image is corrupt or truncated ({type(e).__name__})") from None
  if image.mode != "RGB":
    image = image.convert("RGB")
  return image if image.size == size else image.resize(size, Image.BICUBIC)


def _decode_output(spec):
  """(header dict, raw RGB bytes) for the program's output image; opened without following links."""
  path = os.path.join(spec["work_dir"], spec["output_name"])
  try:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
  except FileNotFoundError:
    return {"output": "missing"}, b""
  except OSError:
    return {"output": "symlink" if os.path.islink(path) else "unreadable"}, b""
  try:
    if not stat.S_ISREG(os.fstat(fd).st_mode):
      return {"output": "not_regular"}, b""
    cap = spec["max_output_bytes"]
    data = os.read(fd, cap + 1)
    if len(data) > cap:
      return {"output": "too_large"}, b""
  finally:
    os.close(fd)
  try:
    image = decode_image(data, spec["max_output_pixels"], spec["max_output_side"], spec["observe_pixels"])
  except ValueError as e:
    return {"output": "invalid", "reason": str(e)}, b""
  except MemoryError:
    return {"output": "invalid", "reason": "output image is too large to decode within the memory limit"}, b""
  return {"output": "ok", "width": image.size[0], "height": image.size[1]}, image.tobytes()


def _write_all(fd, data):
  view = memoryview(data)
  while view:
    view = view[os.write(fd, view):]


def _decoder(spec, limits, header_fd, result_fd):
  """Child: decode the output image as the unprivileged program uid; the raw pixels go straight to the result
  pipe, then a header line (status, size) to the init."""
  code = 1
  try:
    os.dup2(result_fd, 1)
    devnull = os.open("/dev/null", os.O_WRONLY)
    os.dup2(devnull, 2)
    _confine(spec, limits, keep=header_fd)
    header, pixels = _decode_output(spec)
    _write_all(1, pixels)
    _write_all(header_fd, json.dumps(header).encode() + b"\n")
    code = 0
  finally:
    os._exit(code)


def _collect_output(spec, limits, seconds, result_fd):
  """Runs the decoder under its own clock; returns its header (the pixels are already on the result pipe)."""
  read_fd, write_fd = os.pipe()
  pid, expired = _fork_timed(seconds, lambda: _decoder(spec, limits, write_fd, result_fd))
  os.close(write_fd)
  line = b""
  while len(line) <= HEADER_CAP and (chunk := os.read(read_fd, HEADER_CAP)):
    line += chunk
  os.close(read_fd)
  os.kill(pid, signal.SIGKILL)
  os.waitpid(pid, 0)
  signal.setitimer(signal.ITIMER_REAL, 0)
  _reap_everything()
  if expired:
    return {"output": "decode_timeout"}
  try:
    header = json.loads(line)
  except ValueError:
    return {"output": "decode_failed"}
  return header if isinstance(header, dict) else {"output": "decode_failed"}


def main():
  stdin = sys.stdin.buffer
  result_fd = int(sys.argv[2])
  spec = json.loads(stdin.readline())
  if spec["mode"] == "unshare":
    _build_root(spec)
  _mount_work(spec)
  _preload(spec["preload"])
  line = stdin.readline()  # The host sends the call once it has one.
  if not line:
    return  # Closed unused (a warm sandbox at shutdown).
  go = json.loads(line)
  _write_inputs(spec, go["inputs"], stdin)
  devnull = os.open("/dev/null", os.O_RDONLY)
  os.dup2(devnull, 0)
  os.close(devnull)
  sys.stdout.flush()
  limits = dict(spec["rlimits"], RLIMIT_CPU=go["cpu_s"])
  pid, expired = _fork_timed(go["wall_s"], lambda: _run_program(spec, limits))
  _, status, usage = os.wait4(pid, 0)
  signal.setitimer(signal.ITIMER_REAL, 0)
  _reap_everything()
  result = {
      "wall_limit": bool(expired),
      "exit_code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
      "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
      "cpu_s": usage.ru_utime + usage.ru_stime,
      "max_rss_mb": usage.ru_maxrss / 1024,
  }
  if not expired:
    decode_limits = dict(spec["rlimits"], RLIMIT_CPU=max(1, math.ceil(go["decode_s"])) + 1)
    result.update(_collect_output(spec, decode_limits, go["decode_s"], result_fd))
  trailer = json.dumps(result).encode()  # After the pixels (if any), then its own length: see parse_result.
  _write_all(result_fd, trailer + len(trailer).to_bytes(4, "big"))


if __name__ == "__main__":
  main()
