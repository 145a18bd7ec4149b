"""In-sandbox init for one code-tool call (runs as a script inside the namespaces, never imported by the trainer).

It is started by `varft.tools.code.CodeSandbox` with the path of the call spec (JSON) and runs as pid 1 of the
sandbox's pid namespace with the privileges of the sandbox's root, trusted. It:
  1. (unshare mode only) builds the sandbox root itself: a tmpfs with read-only binds of the Python runtime, and
     chroots into it (bubblewrap does this part in bwrap mode);
  2. mounts a size-limited tmpfs at /work;
  3. pre-imports the configured modules (numpy, cv2, ...) so that the program does not pay for them;
     then waits for the call on stdin (a warm sandbox can wait here, started ahead of its call) and copies
     the call's inputs into /work;
  4. forks the program's process: rlimits, all fds but 0-2 closed, privileges dropped to an unprivileged uid
     (whose capabilities vanish with the setuid), no_new_privs, a seccomp denylist, then the program runs as
     `__main__`;
  5. after it exits, kills whatever it left behind, copies the output image out (no symlinks, regular files only,
     size-capped) and writes result.json. The host reads only files this init wrote. Should the host fail to
     kill a program at its wall-clock limit, the init does so itself a little later.
"""
import ctypes
import json
import os
import resource
import signal
import stat
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 38, 24, 47, 4
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

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
  os.chroot(root)
  os.chdir("/")


def _mount_work(spec):
  uid = spec["uid"] if spec["uid"] is not None else os.getuid()
  opts = f"size={spec['work_mb']}m,nr_inodes={spec['work_inodes']},mode=0700,uid={uid},gid={uid}"
  os.makedirs("/work", exist_ok=True)
  _mount("tmpfs", "/work", "tmpfs", MS_NOSUID | MS_NODEV, opts)


def _copy_inputs(spec, names):
  uid = spec["uid"] if spec["uid"] is not None else os.getuid()
  for name in names:
    with open(os.path.join("/in", name), "rb") as src, open(os.path.join("/work", name), "wb") as dst:
      dst.write(src.read())
    os.chown(os.path.join("/work", name), uid, uid)


def _drop_capabilities():
  """Empties the capability sets (needed when no uid switch happens, i.e. inside a user namespace)."""
  header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
  data = (ctypes.c_uint32 * 6)()
  if _libc.capset(header, data) != 0:
    raise OSError(ctypes.get_errno(), "capset failed")
  _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)


# seccomp: a small denylist on top of the dropped capabilities, closing kernel attack surface that an
# unprivileged process still has: new namespaces (user namespaces would hand it capabilities again), mounts,
# ptrace, bpf, perf, userfaultfd, keyrings, io_uring, module loading. clone3 gets ENOSYS (its flags live in
# memory a filter cannot read), which makes libc fall back to clone, whose flags are checked.
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
_NR_CLONE, _NR_CLONE3 = {"x86_64": 56, "aarch64": 220}, 435
_CLONE_NEW_FLAGS = 0x7E020000  # NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET
_EPERM, _ENOSYS = 1, 38


class _SockFilter(ctypes.Structure):
  _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]


class _SockFprog(ctypes.Structure):
  _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def _seccomp_program(machine):
  ld, jeq, jset, ret = 0x20, 0x15, 0x45, 0x06
  allow, kill, errno = 0x7FFF0000, 0x80000000, 0x00050000
  col = 0 if machine == "x86_64" else 1
  prog = [(ld, 0, 0, 4), (jeq, 1, 0, _AUDIT_ARCH[machine]), (ret, 0, 0, kill), (ld, 0, 0, 0)]
  if machine == "x86_64":  # The x32 ABI aliases every syscall above 0x40000000: refuse it wholesale.
    prog += [(jset, 0, 1, 0x40000000), (ret, 0, 0, errno | _EPERM)]
  prog += [(jeq, 0, 1, _NR_CLONE3), (ret, 0, 0, errno | _ENOSYS)]
  for numbers in _SYSCALLS.values():
    prog += [(jeq, 0, 1, numbers[col]), (ret, 0, 0, errno | _EPERM)]
  prog += [(jeq, 0, 3, _NR_CLONE[machine]), (ld, 0, 0, 16), (jset, 0, 1, _CLONE_NEW_FLAGS),
           (ret, 0, 0, errno | _EPERM), (ret, 0, 0, allow)]
  return prog


def _install_seccomp():
  """Installs the denylist (needs no_new_privs). Returns False on an architecture it does not know."""
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
    except Exception:  # The program will see the same import error itself, with its own traceback.
      pass


def _run_program(spec):
  """Child: become the unprivileged program process. Never returns."""
  code = 1
  try:
    os.closerange(3, 1 << 16)
    limits = spec["rlimits"]
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
    os.chdir("/work")
    os.environ.clear()
    os.environ.update(spec["env"])
    sys.argv = [spec["program"]]
    sys.path.insert(0, "/work")
    import runpy  # pylint: disable=g-import-not-at-top
    runpy.run_path(spec["program"], run_name="__main__")
    code = 0
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if not isinstance(e.code, (int, type(None))):
      print(e.code, file=sys.stderr)
  except BaseException as e:  # pylint: disable=broad-except
    code = 1
    try:
      import traceback  # pylint: disable=g-import-not-at-top
      traceback.print_exc()
    except BaseException:  # pylint: disable=broad-except
      os.write(2, f"{type(e).__name__}: {e}\n".encode())
  finally:
    try:
      sys.stdout.flush()
      sys.stderr.flush()
    finally:
      os._exit(code)


def _reap_everything():
  """Kill every process of this pid namespace the program left behind (daemons, fork bombs), then reap them."""
  try:
    os.kill(-1, signal.SIGKILL)
  except ProcessLookupError:
    return
  for _ in range(1 << 16):
    try:
      os.waitpid(-1, 0)
    except ChildProcessError:
      return


def _collect_output(spec):
  """Copy the program's output image to /out without following links; returns a status word."""
  path = os.path.join("/work", spec["output_name"])
  try:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
  except FileNotFoundError:
    return "missing"
  except OSError:
    return "symlink" if os.path.islink(path) else "unreadable"
  try:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
      return "not_regular"
    cap = spec["max_output_bytes"]
    data = os.read(fd, cap + 1)
    if len(data) > cap:
      return "too_large"
  finally:
    os.close(fd)
  with open("/out/output.bin", "wb") as f:
    f.write(data)
  return "ok"


def main():
  with open(sys.argv[1]) as f:
    spec = json.load(f)
  if spec["mode"] == "unshare":
    _build_root(spec)
  _mount_work(spec)
  _preload(spec["preload"])
  line = sys.stdin.buffer.readline()  # The host sends the call once the program and inputs are in /in.
  if not line:
    return  # Closed unused (a warm sandbox at shutdown).
  go = json.loads(line)
  _copy_inputs(spec, go["inputs"])
  spec["rlimits"]["RLIMIT_CPU"] = go["cpu_s"]
  devnull = os.open("/dev/null", os.O_RDONLY)
  os.dup2(devnull, 0)
  os.close(devnull)
  sys.stdout.flush()
  pid = os.fork()
  if pid == 0:
    _run_program(spec)
  # Backstop for the host's wall-clock kill (e.g. if the trainer itself died mid-call): past the limit plus a
  # grace period, kill the program's whole tree from inside.
  expired = []
  def on_alarm(signum, frame):  # pylint: disable=unused-argument
    expired.append(True)
    os.kill(-1, signal.SIGKILL)
  signal.signal(signal.SIGALRM, on_alarm)
  signal.setitimer(signal.ITIMER_REAL, go["wall_s"])
  _, status, usage = os.wait4(pid, 0)
  signal.setitimer(signal.ITIMER_REAL, 0)
  _reap_everything()
  result = {
      "wall_limit": bool(expired),
      "exit_code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
      "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
      "cpu_s": usage.ru_utime + usage.ru_stime,
      "max_rss_mb": usage.ru_maxrss / 1024,
      "output": _collect_output(spec),
  }
  with open("/out/result.json", "w") as f:
    json.dump(result, f)


if __name__ == "__main__":
  main()
