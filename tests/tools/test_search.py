"""Search backends on a small corpus, result formats, caching, web clients against loopback fakes, and the
retrieval server with its client."""
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from tests.tools import fakes
from varft.tools import retrieval_server
from varft.tools import search as search_lib

DOCS = [
    {
        "id": "eiffel",
        "title": "Eiffel Tower",
        "text": "A wrought-iron lattice tower on the Champ de Mars in Paris."
    },
    {
        "id": "wall",
        "title": "Great Wall of China",
        "text": "A series of fortifications built across northern China."
    },
    {
        "id": "python",
        "title": "Python (programming language)",
        "text": "A high-level programming language created by Guido van Rossum, first released in 1991."
    },
    {
        "id": "everest",
        "title": "Mount Everest",
        "text": "Earth's highest mountain above sea level, in the Himalayas."
    },
    {
        "id": "amazon",
        "title": "Amazon River",
        "text": "The largest river by discharge volume, flowing through "
                "South America."
    },
    {
        "id": "mona",
        "title": "Mona Lisa",
        "text": "A half-length portrait painting by Leonardo da Vinci, kept at "
                "the Louvre."
    },
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
  lines = [json.dumps(d) for d in DOCS[:3]] + [
      "{not json",
      json.dumps({"id": "x"}),
      json.dumps({
          "id": "everest",
          "contents": '"Mount Everest"\n' + DOCS[3]["text"]
      })
  ] + [json.dumps(d) for d in DOCS[4:]]
  path.write_text("\n".join(lines) + "\n")
  return str(path)


@pytest.fixture(scope="module")
def bm25_dir(corpus, tmp_path_factory):
  index_dir = str(tmp_path_factory.mktemp("bm25"))
  search_lib.build_index(corpus, index_dir, "bm25")
  return index_dir


def test_read_corpus_skips_malformed_and_reads_search_r1_contents(corpus):
  docs = search_lib.read_corpus(corpus)
  assert [d.id for d in docs] == [d["id"] for d in DOCS]
  assert docs[3].title == "Mount Everest" and docs[3].text == DOCS[3]["text"]


def test_read_corpus_errors_name_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing.jsonl"):
    search_lib.read_corpus(str(tmp_path / "missing.jsonl"))
  bad = tmp_path / "bad.jsonl"
  bad.write_text("garbage\n[1, 2]\n")
  with pytest.raises(ValueError, match="no valid documents"):
    search_lib.read_corpus(str(bad))


def test_bm25_finds_the_right_doc_and_reloads(bm25_dir):
  backend = search_lib.load_index(bm25_dir)
  assert isinstance(backend, search_lib.BM25Backend)
  rows = backend.search(
      ["who created the python programming language", "highest mountain", "portrait painting Leonardo", "zzzz qqqq"], 3)
  assert [r[0].id if r else None for r in rows] == ["python", "everest", "mona", None]
  assert rows[0][0].score > 0 and all(a.score >= b.score for a, b in zip(rows[0], rows[0][1:]))


@pytest.fixture(scope="module")
def encoder():
  return search_lib.load_sentence_encoder()


def test_dense_finds_paraphrases_and_reloads(corpus, encoder, tmp_path):
  built = search_lib.build_index(corpus, str(tmp_path), "dense", encoder=encoder)
  queries = ["tallest peak on the planet", "a famous painting in a Paris museum", "longest waterway in Brazil"]
  expected = ["everest", "mona", "amazon"]
  assert [r[0].id for r in built.search(queries, 2)] == expected
  loaded = search_lib.make_search_backend({"name": "dense", "index_dir": str(tmp_path), "encoder": encoder})
  assert [r[0].id for r in loaded.search(queries, 2)] == expected
  assert all(len(r) == 2 for r in loaded.search(queries, 2))


def test_make_search_backend_builds_once_then_loads(corpus, tmp_path):
  cfg = {"name": "bm25", "index_dir": str(tmp_path / "idx"), "corpus": corpus}
  first = search_lib.make_search_backend(cfg)
  assert isinstance(first, search_lib.CachedBackend) and os.path.exists(tmp_path / "idx" / "index.json")
  mtime = os.path.getmtime(tmp_path / "idx" / "index.json")
  second = search_lib.make_search_backend({**cfg, "corpus": "/does/not/matter.jsonl", "cache_size": 0})
  assert isinstance(second, search_lib.BM25Backend)
  assert os.path.getmtime(tmp_path / "idx" / "index.json") == mtime
  assert second.search(["Great Wall fortifications"], 1)[0][0].id == "wall"


def test_build_index_refuses_a_foreign_directory_and_leaves_no_temp(corpus, tmp_path):
  (tmp_path / "taken").mkdir()
  (tmp_path / "taken" / "notes.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="not an index"):
    search_lib.build_index(corpus, str(tmp_path / "taken"))
  assert sorted(os.listdir(tmp_path)) == ["taken"]  # No half-built index left behind.
  (tmp_path / "empty").mkdir()
  search_lib.build_index(corpus, str(tmp_path / "empty"))  # An empty directory is fine.
  assert os.path.exists(tmp_path / "empty" / "index.json")


def test_make_search_backend_config_errors(bm25_dir, tmp_path, monkeypatch):
  with pytest.raises(ValueError, match="unknown search backend"):
    search_lib.make_search_backend({"name": "bing"})
  with pytest.raises(FileNotFoundError, match="give 'corpus'"):
    search_lib.make_search_backend({"name": "bm25", "index_dir": str(tmp_path)})
  with pytest.raises(ValueError, match="is a 'bm25' index"):
    search_lib.make_search_backend({"name": "dense", "index_dir": bm25_dir})
  monkeypatch.delenv("SERPER_API_KEY", raising=False)
  with pytest.raises(ValueError, match="SERPER_API_KEY"):
    search_lib.make_search_backend({"name": "serper"})


def test_formats():
  docs = [search_lib.Doc("1", "Eiffel Tower", "Tower in   Paris."), search_lib.Doc("2", "", "Just text " * 50)]
  paper = search_lib.format_results(docs, "paper", max_doc_chars=40)
  assert paper.startswith("<information> 1. Content: Eiffel Tower. Tower in Paris.\n2. Content: Just text")
  assert paper.endswith(" ... </information>")
  r1 = search_lib.format_results(docs[:1], "search_r1")
  assert r1 == "<information>Doc 1(Title: Eiffel Tower) Tower in Paris.\n</information>"
  assert "No results" in search_lib.format_results([], "paper")
  with pytest.raises(ValueError, match="unknown search result format"):
    search_lib.format_results(docs, "markdown")


class _CountingBackend(search_lib.SearchBackend):

  def __init__(self):
    self.seen = []

  def search(self, queries, k):
    self.seen.append(list(queries))
    return [[search_lib.Doc(q, q, f"k={k}")] for q in queries]


def test_cache_sends_each_distinct_query_once_and_evicts():
  inner = _CountingBackend()
  cached = search_lib.CachedBackend(inner, max_entries=2)
  assert [r[0].id for r in cached.search(["a", "b", "a"], 4)] == ["a", "b", "a"]
  assert [r[0].id for r in cached.search(["b", "a"], 4)] == ["b", "a"]
  assert inner.seen == [["a", "b"]]
  cached.search(["a"], 2)  # Different k: a new entry, evicts the least recently used ("b").
  cached.search(["b"], 4)
  assert inner.seen == [["a", "b"], ["a"], ["b"]]
  assert (cached.hits, cached.misses) == (3, 4)


def test_rate_limiter_spaces_requests():
  limiter = search_lib.RateLimiter(qps=20)
  start = time.monotonic()
  threads = [threading.Thread(target=limiter.wait) for _ in range(5)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=5)
  assert time.monotonic() - start >= 4 / 20 - 0.01


def test_serper_backend_against_loopback_fake(monkeypatch):
  monkeypatch.setenv("TEST_SERPER_KEY", "sekret")
  service = fakes.FakeService(fakes.serper_reply)
  with fakes.serve(service) as url:
    backend = search_lib.make_search_backend({
        "name": "serper",
        "api_key_env": "TEST_SERPER_KEY",
        "base_url": url,
        "max_qps": 0,
        "batch_size": 2
    })
    rows = backend.search(["eiffel tower height", "mona lisa", "everest"], 4)
    again = backend.search(["mona lisa"], 4)
  assert [len(r) for r in rows] == [4, 4, 4]
  assert rows[1][0].title == "mona lisa title 0" and rows[1][0].text == "snippet 0 about mona lisa"
  assert again == [rows[1]]  # Served from the cache.
  assert len(service.requests) == 2  # Batches of 2 queries; nothing for the cached query.
  path, headers, body = service.requests[0]
  assert headers["x-api-key"] == "sekret" and body == [{
      "q": "eiffel tower height",
      "num": 4
  }, {
      "q": "mona lisa",
      "num": 4
  }]


def test_post_json_retries_then_succeeds():
  service = fakes.FakeService(fakes.retriever_reply, mode="flaky", fail_first=2)
  with fakes.serve(service) as url:
    rows = search_lib.HttpRetrieverBackend(url, retries=3, backoff_s=0.01).search(["q"], 2)
  assert len(service.requests) == 3 and [d.title for d in rows[0]] == ["Doc 0", "Doc 1"]


@pytest.mark.parametrize("mode,attempts,message", [
    ("500", 3, "HTTP 500"),
    ("garbage", 3, "malformed JSON"),
    ("400", 1, "rejected the request: HTTP 400"),
    ("slow", 3, "timeout"),
])
def test_post_json_gives_up_with_a_clear_error(mode, attempts, message):
  service = fakes.FakeService(fakes.retriever_reply, mode=mode, delay_s=1.0)
  with fakes.serve(service) as url:
    backend = search_lib.HttpRetrieverBackend(url, timeout_s=0.2, retries=2, backoff_s=0.01)
    with pytest.raises(search_lib.SearchError, match=message):
      backend.search(["q"], 2)
  assert len(service.requests) == attempts


def test_connection_refused_is_a_search_error():
  with fakes.serve(fakes.FakeService(fakes.retriever_reply)) as url:
    pass  # Closed again: nothing listens on this port now.
  with pytest.raises(search_lib.SearchError, match="connection failed"):
    search_lib.HttpRetrieverBackend(url, timeout_s=1, retries=1, backoff_s=0.01).search(["q"], 2)


@pytest.fixture(scope="module")
def server(bm25_dir):
  backend = search_lib.load_index(bm25_dir)
  srv = retrieval_server.make_server(backend, "127.0.0.1", 0, max_topk=5, info={"kind": "bm25"})
  thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
  thread.start()
  yield f"http://127.0.0.1:{srv.server_address[1]}", backend
  srv.shutdown()
  srv.server_close()
  thread.join(timeout=5)


def test_server_and_client_match_the_local_index(server):
  url, local = server
  client = search_lib.make_search_backend({"name": "http", "url": url, "cache_size": 0})
  queries = ["highest mountain Himalayas", "river South America", "Guido van Rossum language"]
  remote_rows, local_rows = client.search(queries, 3), local.search(queries, 3)
  assert [[d.id for d in r] for r in remote_rows] == [[d.id for d in r] for r in local_rows]
  assert [[d.title for d in r] for r in remote_rows] == [[d.title for d in r] for r in local_rows]
  assert remote_rows[0][0].score == pytest.approx(local_rows[0][0].score)


def _raw_post(url, payload):
  req = urllib.request.Request(url + "/retrieve", data=payload, method="POST",
                               headers={"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(req, timeout=5) as resp:
      return resp.status, json.loads(resp.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def test_server_speaks_search_r1_and_rejects_bad_requests(server):
  url, _ = server
  status, reply = _raw_post(url, json.dumps({"queries": ["Eiffel Tower Paris"], "topk": 2}).encode())
  assert status == 200 and reply["result"][0][0]["contents"].startswith('"Eiffel Tower"\n')
  for bad, message in [(b"{oops", "not valid JSON"), (b'{"queries": "x"}', "list of strings"),
                       (b'{"queries": ["x"], "topk": 50}', "topk")]:
    status, reply = _raw_post(url, bad)
    assert status == 400 and message in reply["error"]
  with urllib.request.urlopen(url + "/health", timeout=5) as resp:
    assert json.loads(resp.read()) == {"status": "ok", "kind": "bm25"}


def test_server_command_line(bm25_dir):
  proc = subprocess.Popen([sys.executable, "-m", "varft.tools.retrieval_server", "--index", bm25_dir, "--port", "0"],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
  try:
    line = proc.stdout.readline()  # "listening on HOST:PORT"; the process exits (EOF) if it fails.
    assert line.startswith("listening on 127.0.0.1:"), line
    url = "http://" + line.split()[-1]
    rows = search_lib.HttpRetrieverBackend(url, timeout_s=5).search(["Leonardo portrait"], 1)
    assert rows[0][0].id == "mona"
  finally:
    proc.kill()
    proc.wait(timeout=10)
