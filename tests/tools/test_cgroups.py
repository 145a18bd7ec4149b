"""SlotCgroups.close: the sandbox's finalizer and a warm start's done-callback may call it at the same time."""
import concurrent.futures
import time

from varft.tools import cgroups


def test_two_threads_closing_at_once_remove_every_cgroup_without_error(tmp_path, monkeypatch):
  tag = tmp_path / f"{cgroups.TAG_PREFIX}1-0"
  slot_dirs = {}
  for slot in range(4):
    (tag / f"slot{slot}").mkdir(parents=True)
    slot_dirs[slot] = [str(tag / f"slot{slot}")]
  groups = cgroups.SlotCgroups(slot_dirs, {}, {}, 2)
  # A slow kill (a straggler to signal) lets both closers list the same slots before either removes one.
  monkeypatch.setattr(groups, "kill_all", lambda slot: time.sleep(0.05))
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    closers = [pool.submit(groups.close) for _ in range(2)]
    for closer in closers:
      closer.result(timeout=10)
  assert groups.slot_dirs == {} and not tag.exists()
