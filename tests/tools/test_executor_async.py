"""The executor's futures: calls run as they are submitted, a stuck tool times out on its own call only."""
import threading
import time

from varft.tools import code as code_lib
from varft.tools import executor as executor_lib
from varft.tools import search as search_lib
from varft.tools.executor import ToolCall


class _Backend(search_lib.SearchBackend):

  def search(self, queries, k):
    return [[search_lib.Doc("0", "Title", f"about {q}")] for q in queries]


class _StuckSandbox:
  """`hang()` blocks until released; anything else prints its program; `boom()` raises."""

  def __init__(self):
    self.release = threading.Event()

  def run(self, program, images=None, timeout_s=None):
    if "hang()" in program:
      self.release.wait(30)
    if "boom()" in program:
      raise RuntimeError("sandbox exploded")
    return code_lib.CodeResult(True, program, "", None, None, 0.0)


def test_a_stuck_call_times_out_alone_and_the_others_go_through():
  sandbox = _StuckSandbox()
  ex = executor_lib.ToolExecutor({"call_timeout_s": 0.5, "max_workers": 4}, search_backend=_Backend(), sandbox=sandbox)
  start = time.monotonic()
  stuck = ex.submit(ToolCall("code", "hang()", call_id="stuck"))
  fast = [ex.submit(ToolCall("search", f"q{i}", call_id=i)) for i in range(3)]
  code = ex.submit(ToolCall("code", "print(1)", call_id="ok"))
  results = [f.result(timeout=5) for f in fast + [code]]
  assert time.monotonic() - start < 0.4  # none of them waited for the stuck call
  assert [r.call_id for r in results] == [0, 1, 2, "ok"] and all(r.ok for r in results)
  assert not stuck.done()
  obs = stuck.result(timeout=5)
  assert 0.4 < time.monotonic() - start < 2.0
  assert not obs.ok and obs.error == "timed out after 0.5 s" and obs.call_id == "stuck" and obs.kind == "code"
  sandbox.release.set()
  time.sleep(0.1)  # the released run finishes later: its result is dropped, not counted twice
  stats = ex.stats()
  assert stats["tools/code/calls"] == 2 and stats["tools/code/timeouts"] == 1 and stats["tools/search/calls"] == 3
  ex.close()


def test_a_crashing_tool_becomes_an_observation_and_execute_keeps_order():
  ex = executor_lib.ToolExecutor({"call_timeout_s": 5}, search_backend=_Backend(), sandbox=_StuckSandbox())
  obs = ex.submit(ToolCall("code", "boom()", call_id=7)).result(timeout=5)
  assert not obs.ok and obs.error == "code tool failed: RuntimeError" and obs.call_id == 7
  out = ex.execute([
      ToolCall("code", "print(2)", call_id="a"),
      ToolCall("search", "x", call_id="b"),
      ToolCall("browse", "y", call_id="c"),
      ToolCall("search", "z", call_id="d")
  ])
  assert [o.call_id for o in out] == ["a", "b", "c", "d"] and [o.ok for o in out] == [True, True, False, True]
  assert ex.stats()["tools/other/calls"] == 1 and ex.stats()["tools/code/errors"] == 1
  ex.close()
