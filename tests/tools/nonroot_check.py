"""Runs the tools tests again as an unprivileged user, from root (CI runs as root):

  python tests/tools/nonroot_check.py [pytest args, default: -q tests/tools]

Creates the user `varft-nonroot` when absent and runs `runuser -u varft-nonroot -- <this python> -m pytest ...`
from the repository root, with the interpreter's folders made reachable (see nonroot.py). Exits with pytest's code.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nonroot  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv):
  why = nonroot.missing_tools()
  if why:
    print(f"nonroot_check: cannot run the tests as a normal user: {why}", file=sys.stderr)
    return 2
  os.chdir(REPO)
  env = {**os.environ, "PYTHONPATH": REPO, "PYTHONDONTWRITEBYTECODE": "1"}
  proc = nonroot.run([sys.executable, "-m", "pytest", *(argv or ["-q", "tests/tools"])], env=env, timeout=3000,
                     capture=False)
  return proc.returncode


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
