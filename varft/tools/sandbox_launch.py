"""How a code sandbox is put together on the host: which files of the interpreter it sees, the bubblewrap or
`unshare` command line, the uids of its slots, and starting one sandbox process.

The view of the host is computed from the configured interpreter itself (asked once, outside any sandbox): its
prefixes, stdlib and site-packages, libpython, where the preloaded modules live, and every hop of the symlink chain
that leads to its binary. That covers the system interpreter, `python3 -m venv` venvs (symlink chains of any
depth, pyvenv.cfg), pyenv and conda-style prefixes. A prefix other than /, /usr, /usr/local is bound whole; from a
system prefix only the interpreter's own parts are, so /bin/sh and the rest of /usr/bin stay out.
"""
import fcntl
import functools
import json
import os
import re
import shutil
import subprocess
import tempfile

INIT_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_init.py")
# Reads the init's source (argv[1] bytes) from stdin and runs it: nothing of the checkout is mounted.
BOOT = ("name='/init.py';import sys;exec(compile(sys.stdin.buffer.read(int(sys.argv[1])),name,'exec'),"
        "{'__name__':'__main__'})")
SCRATCH_PREFIX = "varft-sandbox-"  # Followed by "<pid>-": unshare mode's mount points; stale ones are swept.
SYSTEM_PREFIXES = ("/", "/usr", "/usr/local")
UID_BLOCK = 256  # uids per CodeSandbox (max_concurrency <= 256); blocks are claimed with a lock file each.
INIT_CAPS = ("CAP_SYS_ADMIN", "CAP_SETUID", "CAP_SETGID", "CAP_KILL", "CAP_CHOWN", "CAP_DAC_OVERRIDE",
             "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_SYS_CHROOT", "CAP_SETPCAP")

_FACTS = """
import importlib.util, json, os, site, sys, sysconfig
def where(name):
  spec = importlib.util.find_spec(name.split('.')[0])
  if spec is None:
    return None
  if spec.submodule_search_locations:
    return os.path.dirname(list(spec.submodule_search_locations)[0])
  return os.path.dirname(spec.origin) if spec.origin else None
paths = sysconfig.get_paths()
libdir, soname = sysconfig.get_config_var('LIBDIR'), sysconfig.get_config_var('INSTSONAME')
print(json.dumps({
    'executable': sys.executable,
    'prefixes': [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix],
    'paths': [paths[k] for k in ('stdlib', 'platstdlib', 'purelib', 'platlib')] + site.getsitepackages()
             + [p for p in sys.path if p.endswith('lib-dynload')],
    'libpython': os.path.join(libdir, soname) if libdir and soname else None,
    'modules': {name: where(name) for name in json.loads(sys.argv[1])},
}))
"""


@functools.cache
def interpreter_facts(python, modules=()):
  """Asks `python` (outside any sandbox) where its parts and the given modules live."""
  try:
    out = subprocess.run([python, "-I", "-c", _FACTS, json.dumps(list(modules))], capture_output=True, timeout=60,
                         check=True, stdin=subprocess.DEVNULL, env=init_env())
    return json.loads(out.stdout)
  except (OSError, subprocess.SubprocessError, ValueError) as e:
    detail = getattr(e, "stderr", b"") or b""
    raise RuntimeError(f"code sandbox: cannot run the interpreter {python} ({type(e).__name__}: "
                       f"{detail.decode(errors='replace').strip()[-200:] or e}); set code.python to a working "
                       "Python 3 with numpy, opencv-python and pillow installed") from None


def _resolved_parent(path):
  return os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(path))), os.path.basename(path))


def _dir_links(path):
  """Symlinked directories along `path` (e.g. /bin -> usr/bin), as symlink ops."""
  ops, prefix = [], "/"
  for part in os.path.dirname(path).strip("/").split("/"):
    if not part:
      continue
    prefix = os.path.join(prefix, part)
    if os.path.islink(prefix):
      ops.append(("symlink", os.readlink(prefix), prefix))
  return ops


def interpreter_chain(python):
  """(binary, symlink ops): every hop from `python` (parents resolved) to the real binary, recreated as is."""
  path, ops = _resolved_parent(python), []
  for _ in range(64):
    if not os.path.islink(path):
      return path, ops
    text = os.readlink(path)
    ops.append(("symlink", text, path))
    target = os.path.join(os.path.dirname(path), text)
    ops += _dir_links(os.path.normpath(target))
    path = _resolved_parent(target)
  raise RuntimeError(f"code sandbox: the interpreter {python} is a symlink loop")


def exec_path(facts):
  """The interpreter path the sandbox execs: the interpreter's own idea of itself, parents resolved (a venv's
  bin/python stays a venv's: Python finds pyvenv.cfg next to the unresolved path)."""
  return _resolved_parent(facts["executable"])


def _existing(path):
  return path if path and os.path.lexists(path) else None


def _inside(path, folders):
  return any(path == f or path.startswith(f.rstrip("/") + "/") for f in folders)


def runtime_mounts(facts, extra_ro_paths=()):
  """The read-only view of the host the sandbox gets: (op, source, target), op in ro-bind/symlink."""
  ops = []
  for top in ("/lib", "/lib64", "/lib32", "/libx32"):
    if os.path.islink(top):
      ops.append(("symlink", os.readlink(top), top))
    elif os.path.isdir(top):
      ops.append(("ro-bind", top, top))
  binary, links = interpreter_chain(exec_path(facts))
  paths = ["/usr/lib", "/usr/lib64", "/usr/lib32", "/etc/ld.so.cache", binary, facts["libpython"]]
  paths += [p for p in facts["prefixes"] if os.path.realpath(p) not in SYSTEM_PREFIXES]
  paths += facts["paths"] + [p for p in facts["modules"].values() if p] + list(extra_ro_paths)
  chosen = []
  for p in sorted({os.path.realpath(p) for p in paths if _existing(p)}, key=len):
    if not _inside(p, chosen):
      chosen.append(p)
  ops += [("ro-bind", p, p) for p in sorted(chosen)]
  seen = {dst for _, _, dst in ops}
  for op in links:
    if op[2] not in seen and not _inside(op[2], chosen):
      ops.append(op)
      seen.add(op[2])
  return ops


def _ancestors(paths):
  """All proper ancestor directories of absolute paths, parents first ("/" excluded)."""
  found = set()
  for path in paths:
    parent = os.path.dirname(path)
    while parent not in ("/", ""):
      found.add(parent)
      parent = os.path.dirname(parent)
  return sorted(found, key=lambda p: (p.count("/"), p))


def work_dir(mounts):
  """Where the program's tmpfs goes: /work, or another name where the runtime itself lives under /work."""
  targets = [dst for _, _, dst in mounts]
  for name in ("/work", "/sandbox", "/sandbox-work"):
    if not any(_inside(t, [name]) or _inside(name, [t]) for t in targets):
      return name
  raise RuntimeError("code sandbox: the runtime's mounts cover /work, /sandbox and /sandbox-work")


def command(isolation, root, mounts, python, result_fd):
  """The command line of one sandbox (bwrap or unshare) running the init on `python`."""
  init = [python, "-I", "-B", "-c", BOOT, str(os.path.getsize(INIT_SCRIPT)), str(result_fd)]
  if isolation == "bwrap":
    cmd = [
        "bwrap", "--die-with-parent", "--new-session", "--as-pid-1", "--unshare-ipc", "--unshare-pid", "--unshare-net",
        "--unshare-uts", "--unshare-cgroup-try", "--hostname", "sandbox"
    ]
    if not root:
      # uid 0 inside the user namespace: with any other uid, --dev makes bwrap nest a second user namespace
      # in which the init may no longer mount (`mount tmpfs -> /work: Operation not permitted`).
      cmd += ["--unshare-user", "--uid", "0", "--gid", "0"]
    cmd += ["--cap-drop", "ALL"]
    for cap in INIT_CAPS:
      cmd += ["--cap-add", cap]
    for parent in _ancestors(dst for _, _, dst in mounts):  # bwrap would create them 0700.
      cmd += ["--perms", "0755", "--dir", parent]
    for op, src, dst in mounts:
      cmd += ["--symlink", src, dst] if op == "symlink" else [f"--{op}", src, dst]
    return cmd + [
        "--dev", "/dev", "--proc", "/proc", "--dir",
        work_dir(mounts), "--remount-ro", "/", "--chdir", "/", "--"
    ] + init
  cmd = ["unshare", "--mount", "--net", "--pid", "--ipc", "--uts", "--fork", "--kill-child", "--propagation", "private"]
  if not root:
    cmd += ["--user", "--map-root-user"]
  return cmd + init


def unshare_extra_mounts(mounts):
  devices = [("dev-bind", f"/dev/{d}", f"/dev/{d}") for d in ("null", "zero", "random", "urandom")]
  return devices + [("dir", "", work_dir(mounts))]


def init_source():
  with open(INIT_SCRIPT, "rb") as f:
    return f.read()


def start(make_command, spec, cgroups=None, slot=None):
  """Starts one sandbox process (`make_command(result fd)`), hands it the init and its spec; returns (proc,
  read end of the result pipe)."""
  source = init_source()
  read_fd, write_fd = os.pipe()
  try:
    cmd = make_command(write_fd)
    if cgroups:
      cmd = cgroups.wrap(slot, cmd)
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=init_env(),
                            start_new_session=True, pass_fds=(write_fd,))
  except BaseException:
    os.close(read_fd)
    raise
  finally:
    os.close(write_fd)
  try:
    proc.stdin.write(source + json.dumps(spec).encode() + b"\n")
    proc.stdin.flush()
  except BrokenPipeError:
    pass  # It died at once; the call reports it with its stderr.
  return proc, read_fd


def make_scratch(tmp_dir):
  """An empty host folder to mount the sandbox root on (unshare mode); removed with the sandbox."""
  return tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-", dir=tmp_dir)


def sweep_scratch(tmp_dir=None):
  """Removes the scratch folders of dead trainer processes (e.g. after a SIGKILL); returns how many."""
  parent = tmp_dir or tempfile.gettempdir()
  pattern = re.compile(re.escape(SCRATCH_PREFIX) + r"(\d+)-")
  removed = 0
  try:
    names = os.listdir(parent)
  except OSError:
    return 0
  for name in names:
    match = pattern.match(name)
    path = os.path.join(parent, name)
    if not match or os.path.exists(f"/proc/{match.group(1)}"):
      continue
    try:
      if os.lstat(path).st_uid != os.geteuid():
        continue
    except OSError:
      continue
    shutil.rmtree(path, ignore_errors=True)
    removed += 1
  return removed


def claim_uid_block(uid_base, lock_dir=None):
  """Claims a block of UID_BLOCK uids no other CodeSandbox on this host holds (one flock'ed file per block,
  released when the holder closes it or dies). Returns (first uid, lock fd)."""
  lock_dir = lock_dir or os.path.join(tempfile.gettempdir(), "varft-sandbox-uids")
  os.makedirs(lock_dir, mode=0o700, exist_ok=True)
  for block in range(((1 << 31) - uid_base) // UID_BLOCK):
    fd = os.open(os.path.join(lock_dir, f"block-{block}"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      continue
    return uid_base + block * UID_BLOCK, fd
  raise RuntimeError(f"code sandbox: every uid block above {uid_base} is taken")


def program_env(work):
  return {"HOME": work, "TMPDIR": work, "LANG": "C.UTF-8", "PATH": "/usr/bin:/bin", **THREAD_ENV}


# One thread per library: a call is one CPU's worth of work, and in rlimit-only mode threads count as tasks.
THREAD_ENV = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENCV_FOR_THREADS_NUM": "1"
}


def init_env():
  return {"LANG": "C.UTF-8", "PATH": os.environ.get("PATH", "/usr/bin:/bin"), **THREAD_ENV}


def candidates(preference):
  """The isolation mechanisms to try, in order, for a preference; raises if none is installed."""
  if preference not in ("auto", "bwrap", "unshare"):
    raise ValueError(f"sandbox isolation must be 'auto', 'bwrap' or 'unshare', got {preference!r}")
  wanted = ("bwrap", "unshare") if preference == "auto" else (preference,)
  found = [name for name in wanted if shutil.which(name)]
  if not found:
    raise RuntimeError(f"no code sandbox is available ({' or '.join(wanted)} not found): install bubblewrap "
                       "(apt-get install bubblewrap), or util-linux `unshare` with user namespaces allowed")
  return found
