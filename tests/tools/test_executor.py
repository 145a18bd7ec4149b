"""The tool executor: mixed batches, ordering, failure -> observation (never an exception), and metrics."""
import numpy as np
from PIL import Image
import pytest

from tests.tools import fakes
from varft.tools import executor as executor_lib
from varft.tools import search as search_lib
from varft.tools.executor import ToolCall

ROTATE = ("<think>upside down</think><code>```python\nimport cv2\nimg = cv2.imread('path_to_input_image.jpg')\n"
          "print('shape', img.shape)\n"
          "cv2.imwrite('path_to_output_image.jpg', cv2.rotate(img, cv2.ROTATE_180))\n```</code>")


@pytest.fixture(scope="module")
def sandbox():
  from varft.tools import code as code_lib  # pylint: disable=g-import-not-at-top
  return code_lib.CodeSandbox(dict(timeout_s=30, max_concurrency=4))


class _StaticBackend(search_lib.SearchBackend):

  def search(self, queries, k):
    return [[search_lib.Doc(str(i), f"Title {i}", f"about {q}") for i in range(k + 3)] for q in queries]


class _BrokenSandbox:

  def run(self, *args, **kwargs):
    raise RuntimeError("disk on fire")


def _image():
  a = np.zeros((12, 20, 3), np.uint8)
  a[:6] = 255  # Top half white: rotated by 180 degrees it becomes the bottom half.
  return Image.fromarray(a)


def test_mixed_batch_in_order(sandbox):
  ex = executor_lib.ToolExecutor({"topk": 2}, search_backend=_StaticBackend(), sandbox=sandbox)
  calls = [
      ToolCall("search", "eiffel  tower\n", call_id="a"),
      ToolCall("code", ROTATE, {"path_to_input_image.jpg": _image()}, call_id="b"),
      ToolCall("search", "   ", call_id="c"),
      ToolCall("browse", "x", call_id="d"),
      ToolCall("code", "<code>```python\nraise KeyError('box')\n```</code>", call_id="e")
  ]
  obs = ex.execute(calls)
  assert [o.call_id for o in obs] == ["a", "b", "c", "d", "e"]
  assert [o.ok for o in obs] == [True, True, False, False, False]
  assert obs[0].text == ("<information> 1. Content: Title 0. about eiffel tower\n"
                         "2. Content: Title 1. about eiffel tower </information>")
  assert obs[1].text == "shape (12, 20, 3)" and obs[1].kind == "code"
  out = np.asarray(obs[1].image)
  assert out[6:].mean() > 240 and out[:6].mean() < 15
  assert obs[2].error == "empty search query"
  assert "unknown tool 'browse'" in obs[3].error
  assert obs[4].text == "Error: exception: KeyError: 'box'" and obs[4].image is None
  stats = ex.stats()
  assert stats["tools/search/calls"] == 2 and stats["tools/search/errors"] == 1
  assert stats["tools/code/calls"] == 2 and stats["tools/code/errors"] == 1
  assert stats["tools/other/calls"] == 1
  assert stats["tools/code/wall_s_max"] > 0 and stats["tools/code/error_rate"] == 0.5
  ex.close()


@pytest.mark.parametrize("mode,message", [("500", "HTTP 500"), ("garbage", "malformed JSON"),
                                          ("slow", "search timed out")])
def test_search_faults_become_observations(mode, message):
  service = fakes.FakeService(fakes.retriever_reply, mode=mode, delay_s=3.0)
  with fakes.serve(service) as url:
    cfg = {
        "search": {
            "name": "http",
            "url": url,
            "timeout_s": 5,
            "retries": 1,
            "backoff_s": 0.01
        },
        "search_timeout_s": 0.5
    }
    with executor_lib.ToolExecutor(cfg) as ex:
      obs = ex.execute([ToolCall("search", "q1"), ToolCall("search", "q2")])
      assert [o.ok for o in obs] == [False, False]
      assert all(message in o.error and o.text.startswith("Error: ") for o in obs), obs[0].error
      stats = ex.stats(reset=True)
      assert stats["tools/search/errors"] == 2
      assert stats["tools/search/timeouts"] == (2 if mode == "slow" else 0)
      assert ex.stats() == {"tools/search/cache_hits": 0, "tools/search/cache_misses": 2}


def test_backend_down_and_recovering():
  service = fakes.FakeService(fakes.retriever_reply, mode="flaky", fail_first=4)
  with fakes.serve(service) as url:
    cfg = {"search": {"name": "http", "url": url, "retries": 1, "backoff_s": 0.01}}
    with executor_lib.ToolExecutor(cfg) as ex:
      first = ex.execute([ToolCall("search", "q")])  # Two attempts, both 500.
      second = ex.execute([ToolCall("search", "q")])  # Two more 500s.
      third = ex.execute([ToolCall("search", "q")])  # Service is back.
  assert (first[0].ok, second[0].ok, third[0].ok) == (False, False, True)
  assert "1. Content: Doc 0. about q" in third[0].text


def test_code_timeout_and_crashing_sandbox(sandbox):
  with executor_lib.ToolExecutor({"code_timeout_s": 1.0}, sandbox=sandbox) as ex:
    obs = ex.execute([ToolCall("code", "import time\ntime.sleep(30)")])
    assert not obs[0].ok and obs[0].error.startswith("timeout") and obs[0].wall_s < 8
    assert ex.stats()["tools/code/timeouts"] == 1
  with executor_lib.ToolExecutor({}, sandbox=_BrokenSandbox()) as ex:
    obs = ex.execute([ToolCall("code", "print(1)")])
    assert not obs[0].ok and obs[0].error == "code tool failed: RuntimeError"


def test_disabled_tools_and_config_errors():
  with executor_lib.ToolExecutor({}) as ex:
    obs = ex.execute([ToolCall("search", "q"), ToolCall("code", "print(1)")])
  assert [o.error for o in obs] == ["the search tool is not enabled", "the code tool is not enabled"]
  with pytest.raises(ValueError, match="unknown tool executor config keys"):
    executor_lib.ToolExecutor({"top_k": 3})
  with pytest.raises(ValueError, match="unknown search result format"):
    executor_lib.ToolExecutor({"search_format": "html"})


def test_long_code_output_is_capped(sandbox):
  with executor_lib.ToolExecutor({"max_text_chars": 100}, sandbox=sandbox) as ex:
    obs = ex.execute([ToolCall("code", "print('y' * 5000)\nopen('path_to_output_image.jpg', 'w')")])
  assert len(obs[0].text) <= 104 and obs[0].text.startswith("yyy")


def test_executor_builds_both_tools_from_config(tmp_path):
  corpus = tmp_path / "corpus.jsonl"
  corpus.write_text('{"id": "1", "title": "Louvre", "text": "The Louvre museum in Paris holds the Mona Lisa."}\n'
                    '{"id": "2", "title": "Prado", "text": "The Prado museum in Madrid."}\n')
  cfg = {
      "search": {
          "name": "bm25",
          "index_dir": str(tmp_path / "idx"),
          "corpus": str(corpus)
      },
      "code": {
          "max_concurrency": 1,
          "prewarm": False,
          "preload": []
      },
      "topk": 1
  }
  with executor_lib.ToolExecutor(cfg) as ex:
    obs = ex.execute([ToolCall("search", "where is the Mona Lisa"), ToolCall("code", "print(6 * 7)")])
    assert obs[0].text == "<information> 1. Content: Louvre. The Louvre museum in Paris holds the Mona Lisa. " \
                          "</information>"
    assert obs[1].text.startswith("42\nError: no output image")
    assert ex.sandbox.isolation in ("bwrap", "unshare")
  assert not ex.sandbox._close.alive  # pylint: disable=protected-access  # close() closed the sandbox it made.
