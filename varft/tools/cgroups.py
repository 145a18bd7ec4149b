"""Per-slot cgroups for the code sandbox: a cap on the *total* memory and task count of one call.

rlimits are per process, so a program that forks 30 children of 2 GiB each escapes RLIMIT_AS; a memory cgroup
holds the whole call (tmpfs pages included) to one budget, and the kernel OOM-kills inside it, not the trainer.
Used where the host lets us create cgroups (root with a cgroup v1 memory/pids hierarchy, or a cgroup v2 subtree
with the controllers delegated); elsewhere the sandbox runs on rlimits alone and says so.
"""
import itertools
import logging
import os
import signal
import threading
import time

log = logging.getLogger(__name__)
TAG_PREFIX = "varft-sandbox-"  # Followed by "<pid>-<n>": stale ones (dead pid) are removed on sight.
_COUNTER = itertools.count()


def _mounts():
  """{controller or 'cgroup2': (mount point, mount root)} from /proc/self/mountinfo."""
  found = {}
  with open("/proc/self/mountinfo") as f:
    for line in f:
      pre, _, post = line.partition(" - ")
      fields, fs = pre.split(), post.split()
      if not fs:
        continue
      if fs[0] == "cgroup2":
        found.setdefault("cgroup2", (fields[4], fields[3]))
      elif fs[0] == "cgroup":
        for opt in fs[2].split(","):
          if opt in ("memory", "pids"):
            found.setdefault(opt, (fields[4], fields[3]))
  return found


def _own_paths():
  """{controller or 'cgroup2': this process's cgroup path} from /proc/self/cgroup."""
  paths = {}
  with open("/proc/self/cgroup") as f:
    for line in f:
      hid, controllers, path = line.rstrip("\n").split(":", 2)
      if hid == "0" and not controllers:
        paths["cgroup2"] = path
      for c in controllers.split(","):
        paths[c] = path
  return paths


def _dir(mount, own_path):
  point, root = mount
  rel = os.path.relpath(own_path, root) if own_path.startswith(root) else own_path.lstrip("/")
  return os.path.normpath(os.path.join(point, rel))


def _remove_stale(parent):
  """Removes (empty) sandbox cgroups left by processes that no longer exist, e.g. after a crash."""
  try:
    names = [n for n in os.listdir(parent) if n.startswith(TAG_PREFIX)]
  except OSError:
    return
  for name in names:
    pid = name[len(TAG_PREFIX):].split("-")[0]
    if not pid.isdigit() or os.path.exists(f"/proc/{pid}"):
      continue
    tag_dir = os.path.join(parent, name)
    for slot in os.listdir(tag_dir):
      if slot.startswith("slot"):
        try:
          os.rmdir(os.path.join(tag_dir, slot))
        except OSError:
          pass
    try:
      os.rmdir(tag_dir)
    except OSError:
      pass


def _write(path, value):
  with open(path, "w") as f:
    f.write(str(value))


class SlotCgroups:
  """One cgroup (memory + tasks) per sandbox slot, created under this process's own cgroup and removed by
  `close()`. `wrap(slot, cmd)` makes the command join the slot's cgroup before it execs."""

  def __init__(self, slot_dirs, procs_files, oom_files, version):
    self.slot_dirs = slot_dirs  # slot -> list of cgroup dirs (one per hierarchy).
    self.procs_files = procs_files  # slot -> list of cgroup.procs paths.
    self.oom_files = oom_files  # slot -> file holding the oom_kill counter.
    self.version = version
    # The sandbox's finalizer and a warm start's done-callback (the spawner's thread) may both close.
    self._closing = threading.Lock()

  @classmethod
  def create(cls, slots, memory_bytes, max_tasks):
    """Returns SlotCgroups, or None (with the reason logged) where cgroups cannot be used here."""
    tag = f"{TAG_PREFIX}{os.getpid()}-{next(_COUNTER)}"
    if not os.path.exists("/bin/sh"):
      log.info("code sandbox: no /bin/sh to join cgroups; per-call memory relies on rlimits only")
      return None
    try:
      mounts, own = _mounts(), _own_paths()
      if "memory" in mounts and "memory" in own:
        return cls._create_v1(slots, memory_bytes, max_tasks, tag, mounts, own)
      if "cgroup2" in mounts and "cgroup2" in own:
        return cls._create_v2(slots, memory_bytes, max_tasks, tag, mounts, own)
      log.info("code sandbox: no cgroup memory controller found; per-call memory relies on rlimits only")
    except OSError as e:
      log.info("code sandbox: cgroups unavailable (%s); per-call memory relies on rlimits only", e)
    return None

  @classmethod
  def _create_v1(cls, slots, memory_bytes, max_tasks, tag, mounts, own):
    parents = [_dir(mounts["memory"], own["memory"])]
    if "pids" in mounts and "pids" in own:
      parents.append(_dir(mounts["pids"], own["pids"]))
    for parent in parents:
      _remove_stale(parent)
    made = cls({}, {}, {}, 1)
    try:
      for slot in slots:
        for parent in parents:
          d = os.path.join(parent, tag, f"slot{slot}")
          os.makedirs(d, exist_ok=True)
          made.slot_dirs.setdefault(slot, []).append(d)
          if os.path.exists(os.path.join(d, "memory.limit_in_bytes")):
            _write(os.path.join(d, "memory.limit_in_bytes"), memory_bytes)
            if os.path.exists(os.path.join(d, "memory.memsw.limit_in_bytes")):
              _write(os.path.join(d, "memory.memsw.limit_in_bytes"), memory_bytes)  # No escape into swap.
            made.oom_files[slot] = os.path.join(d, "memory.oom_control")
          else:
            _write(os.path.join(d, "pids.max"), max_tasks)
          made.procs_files.setdefault(slot, []).append(os.path.join(d, "cgroup.procs"))
    except OSError:
      made.close()
      raise
    return made

  @classmethod
  def _create_v2(cls, slots, memory_bytes, max_tasks, tag, mounts, own):
    parent = _dir(mounts["cgroup2"], own["cgroup2"])
    with open(os.path.join(parent, "cgroup.subtree_control")) as f:
      enabled = f.read().split()
    if "memory" not in enabled:
      log.info("code sandbox: cgroup v2 memory controller not delegated to %s; rlimits only", parent)
      return None
    _remove_stale(parent)
    made = cls({}, {}, {}, 2)
    try:
      base = os.path.join(parent, tag)
      os.makedirs(base, exist_ok=True)
      _write(os.path.join(base, "cgroup.subtree_control"),
             " ".join(f"+{c}" for c in ("memory", "pids") if c in enabled))
      for slot in slots:
        d = os.path.join(base, f"slot{slot}")
        os.makedirs(d, exist_ok=True)
        made.slot_dirs[slot] = [d]
        _write(os.path.join(d, "memory.max"), memory_bytes)
        if os.path.exists(os.path.join(d, "memory.oom.group")):
          _write(os.path.join(d, "memory.oom.group"), 1)  # An OOM kill takes the whole call down at once.
        if os.path.exists(os.path.join(d, "memory.swap.max")):
          _write(os.path.join(d, "memory.swap.max"), 0)
        if os.path.exists(os.path.join(d, "pids.max")):
          _write(os.path.join(d, "pids.max"), max_tasks)
        made.oom_files[slot] = os.path.join(d, "memory.events")
        made.procs_files[slot] = [os.path.join(d, "cgroup.procs")]
    except OSError:
      made.close()
      raise
    return made

  def wrap(self, slot, cmd):
    """`cmd` prefixed by a shell that moves itself into the slot's cgroups, then execs (no race: every
    process of the call is forked after the move)."""
    script = 'for f in "$@"; do [ "$f" = -- ] && break; echo $$ > "$f" || exit 125; shift; done; shift; exec "$@"'
    return ["/bin/sh", "-c", script, "sh", *self.procs_files[slot], "--", *cmd]

  def oom_kills(self, slot):
    """How many processes the kernel OOM-killed in this slot's cgroup so far."""
    try:
      with open(self.oom_files[slot]) as f:
        for line in f:
          key, _, value = line.partition(" ")
          if key == "oom_kill":
            return int(value)
    except (OSError, KeyError, ValueError):
      pass
    return 0

  def kill_all(self, slot):
    """SIGKILLs every process still in the slot's cgroups (a dying sandbox's stragglers)."""
    for procs in self.procs_files.get(slot, []):
      try:
        with open(procs) as f:
          pids = [int(p) for p in f.read().split()]
      except OSError:
        continue
      for pid in pids:
        try:
          os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
          pass

  def close(self, wait_s=2.0):
    """Kills what is left in the cgroups and removes them, waiting up to `wait_s` for dying processes to leave;
    safe to call again later for any that could not go yet, and from several threads at once (one at a time)."""
    with self._closing:
      self._remove_all(wait_s)

  def _remove_all(self, wait_s):
    deadline = time.monotonic() + wait_s
    tags = {os.path.dirname(d) for dirs in self.slot_dirs.values() for d in dirs}
    while self.slot_dirs:
      for slot, dirs in list(self.slot_dirs.items()):
        self.kill_all(slot)
        left = []
        for d in dirs:
          try:
            os.rmdir(d)
          except FileNotFoundError:
            pass
          except OSError:
            left.append(d)
        if left:
          self.slot_dirs[slot] = left
        else:
          del self.slot_dirs[slot]
      if not self.slot_dirs or time.monotonic() > deadline:
        break
      time.sleep(0.02)
    for t in tags:
      try:
        os.rmdir(t)
      except OSError:
        pass
