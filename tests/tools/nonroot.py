"""Runs a command as an unprivileged user from a root process (CI runs as root), for the sandbox's non-root paths.

The user (`varft-nonroot`) is created when absent. Folders the interpreter or the checkout live in that the user
cannot enter (pyenv under a 0700 /root, say) are made reachable in a private mount namespace only: a 0755 tmpfs
over the closed folder with the needed entries bound back in. Nothing on the host changes but the user.
"""
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile

USER = "varft-nonroot"


def missing_tools():
  """Why a non-root run cannot be made here, or None."""
  if os.geteuid() != 0:
    return "not running as root (no user to switch to)"
  absent = [t for t in ("useradd", "runuser", "unshare", "mount") if not shutil.which(t)]
  return f"{', '.join(absent)} not installed" if absent else None


def ensure_user():
  try:
    pwd.getpwnam(USER)
  except KeyError:
    subprocess.run(["useradd", "-m", USER], check=True, capture_output=True)
  return pwd.getpwnam(USER)


def _closed_ancestors(path):
  """(closed folder, its child on the way to `path`) for each ancestor others may not enter."""
  found = []
  parts = os.path.realpath(path).strip("/").split("/")
  for i in range(len(parts) - 1):
    folder = "/" + "/".join(parts[:i])
    if not os.stat(folder).st_mode & stat.S_IXOTH:
      found.append((folder, os.path.join(folder, parts[i])))
  return found


def needed_paths():
  return [
      os.path.realpath(sys.executable), sys.prefix, sys.base_prefix,
      os.getcwd(), *[p for p in sys.path if p and os.path.isdir(p)]
  ]


def command(argv, paths=None):
  """(command, staging folder) running `argv` as USER with `paths` reachable; remove the folder afterwards."""
  reopen = {}
  for path in paths or needed_paths():
    for folder, child in _closed_ancestors(path):
      if not any(folder.startswith(other + "/") for other in reopen):
        reopen.setdefault(folder, set()).add(child)
  staging = tempfile.mkdtemp(prefix="varft-nonroot-")
  lines = ["set -e"]
  for n, (folder, children) in enumerate(sorted(reopen.items())):
    for m, child in enumerate(sorted(children)):
      lines += [f"mkdir -p {staging}/{n}-{m}", f"mount --rbind '{child}' {staging}/{n}-{m}"]
    lines.append(f"mount -t tmpfs -o mode=0755 tmpfs '{folder}'")
    for m, child in enumerate(sorted(children)):
      lines += [f"mkdir -p '{child}'", f"mount --rbind {staging}/{n}-{m} '{child}'"]
  lines.append(f'exec runuser -u {USER} -- "$@"')
  script = "\n".join(lines)
  return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *argv], staging


def run(argv, env=None, timeout=600, capture=True):
  """Runs `argv` as USER (see module doc); returns the CompletedProcess."""
  user = ensure_user()
  cmd, staging = command(argv)
  env = {**(env or os.environ), "HOME": user.pw_dir, "USER": USER, "LOGNAME": USER}
  try:
    return subprocess.run(cmd, env=env, timeout=timeout, capture_output=capture, text=True, stdin=subprocess.DEVNULL)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
