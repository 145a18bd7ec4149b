"""Slow and hostile services and peers (issue 14, items 8, 9 and 11's corpus part): a dripping or oversized reply,
stuck search workers, stalled and malformed clients of the retrieval server, a loopback load test, and corpus
lines that are not UTF-8 or start with a byte-order mark. Everything runs on 127.0.0.1, bounded in count and time."""
import codecs
import concurrent.futures
import contextlib
import http.client
import json
import socket
import threading
import time

import pytest

from varft.tools import executor as executor_lib
from varft.tools import retrieval_server
from varft.tools import search as search_lib
from varft.tools.executor import ToolCall

REPLY = json.dumps({"result": [[{"document": {"id": "1", "title": "T", "text": "x"}, "score": 1.0}]]}).encode()


@contextlib.contextmanager
def raw_server(respond):
  """A loopback TCP server calling respond(conn) per connection (in its own thread); yields the URL."""
  srv = socket.socket()
  srv.bind(("127.0.0.1", 0))
  srv.listen(16)
  stop = threading.Event()

  def serve():
    srv.settimeout(0.1)
    while not stop.is_set():
      try:
        conn, _ = srv.accept()
      except OSError:
        continue
      threading.Thread(target=_guarded, args=(respond, conn), daemon=True).start()

  thread = threading.Thread(target=serve, daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{srv.getsockname()[1]}"
  finally:
    stop.set()
    thread.join(timeout=5)
    srv.close()


def _guarded(respond, conn):
  with conn:
    try:
      conn.recv(1 << 16)
      respond(conn)
    except OSError:
      pass  # The client gave up.


def _drip(data, every_s=0.25):

  def respond(conn):
    for i in range(len(data)):
      conn.sendall(data[i:i + 1])
      time.sleep(every_s)

  return respond


@pytest.mark.parametrize("where", ["body", "headers"])
def test_a_dripping_reply_is_cut_at_the_total_deadline(where):
  head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(REPLY)
  if where == "headers":
    respond = _drip(head + REPLY)  # One byte at a time from the status line on.
  else:
    respond = lambda conn: (conn.sendall(head), _drip(REPLY)(conn))
  with raw_server(respond) as url:
    start = time.monotonic()
    with pytest.raises(search_lib.SearchError, match="after 1 attempts: timeout"):
      search_lib.HttpRetrieverBackend(url, timeout_s=1.0, retries=0).search(["q"], 1)
    assert time.monotonic() - start < 2.5  # Per-read timeouts alone: ~len(REPLY) / 4 seconds.


@pytest.mark.parametrize("with_length", [True, False])
def test_an_oversized_reply_is_refused_without_buffering_it(with_length):
  size = 3 << 20

  def respond(conn):
    conn.sendall(b"HTTP/1.1 200 OK\r\n" +
                 (b"Content-Length: %d\r\n" % size if with_length else b"Connection: close\r\n") + b"\r\n")
    for _ in range(size >> 16):
      conn.sendall(b" " * (1 << 16))

  with raw_server(respond) as url:
    backend = search_lib.HttpRetrieverBackend(url, timeout_s=10, retries=2, max_reply_mb=1)
    start = time.monotonic()
    with pytest.raises(search_lib.SearchError, match="larger than 1 MB"):
      backend.search(["q"], 1)
    assert time.monotonic() - start < 5  # Not retried: a reply over the cap will not shrink.


class _StuckThenFast(search_lib.SearchBackend):
  """Hangs (until released) on its first `stuck` requests, answers at once afterwards."""

  def __init__(self, stuck):
    self.stuck, self.calls, self.release = stuck, 0, threading.Event()
    self._lock = threading.Lock()

  def search(self, queries, k):
    with self._lock:
      self.calls += 1
      n = self.calls
    if n <= self.stuck:
      self.release.wait(30)
    return [[search_lib.Doc("d", "Title", f"about {q}")] for q in queries]


def test_stuck_search_workers_are_abandoned():
  backend = _StuckThenFast(stuck=3)
  ex = executor_lib.ToolExecutor({"search_timeout_s": 0.3}, search_backend=backend)
  try:
    for _ in range(3):  # Three stuck requests: more than the two workers a fixed pool would have.
      assert "timed out" in ex.execute([ToolCall("search", "q")])[0].error
    obs = ex.execute([ToolCall("search", "recovered")])  # Queued behind the stuck ones, it would time out.
    assert obs[0].ok and "about recovered" in obs[0].text
    assert ex.stats()["tools/search/abandoned"] == 3
  finally:
    backend.release.set()


def test_too_many_stuck_searches_fail_fast():
  backend = _StuckThenFast(stuck=100)
  ex = executor_lib.ToolExecutor({"search_timeout_s": 0.05}, search_backend=backend)
  try:
    for _ in range(executor_lib.MAX_STUCK_SEARCHES):
      ex.execute([ToolCall("search", "q")])
    obs = ex.execute([ToolCall("search", "q")])
    assert "not answering" in obs[0].error  # Not "timed out": it did not wait.
    assert backend.calls == executor_lib.MAX_STUCK_SEARCHES  # No more threads piled up.
    backend.release.set()
    deadline = time.monotonic() + 10
    while ex._stuck and time.monotonic() < deadline:  # pylint: disable=protected-access
      time.sleep(0.02)
    assert ex.execute([ToolCall("search", "back")])[0].ok  # Once they return, searches go through again.
  finally:
    backend.release.set()


def test_corpus_with_bom_and_bad_utf8_lines(tmp_path, caplog):
  path = tmp_path / "corpus.jsonl"
  good = [json.dumps({"id": str(i), "title": f"T{i}", "text": f"text {i}"}).encode() for i in range(4)]
  deep = b"[" * 5000 + b"]" * 5000
  path.write_bytes(codecs.BOM_UTF8 + good[0] + b"\n" + good[1] + b"\n" + b'{"id": "x", "text": "caf\xe9"}\n' + deep +
                   b"\n" + good[2] + b"\n" + good[3] + b"\n")
  with caplog.at_level("WARNING", logger="varft.tools.search"):
    docs = search_lib.read_corpus(str(path))
  assert [d.id for d in docs] == ["0", "1", "2", "3"]  # The BOM no longer costs the first document.
  assert f"corpus {path} line 3 skipped: not UTF-8 (byte 24)" in caplog.text
  assert f"corpus {path} line 4 skipped" in caplog.text and "skipped 2 malformed lines of 6" in caplog.text
  bad = tmp_path / "all-bad.jsonl"
  bad.write_bytes(b"\xff\xfe\n")
  with pytest.raises(ValueError, match=f"search corpus {bad} has no valid documents .1 malformed"):
    search_lib.read_corpus(str(bad))


class _Fast(search_lib.SearchBackend):

  def search(self, queries, k):
    return [[search_lib.Doc("d", "Title", q)] for q in queries]


@contextlib.contextmanager
def bounded_server(**kwargs):
  srv = retrieval_server.make_server(_Fast(), "127.0.0.1", 0, **kwargs)
  thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
  thread.start()
  try:
    yield srv, srv.server_address[1]
  finally:
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


def _request(port, method, body=None, headers=None, timeout=5):
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
  try:
    conn.request(method, "/retrieve", body=body, headers=headers or {})
    resp = conn.getresponse()
    return resp.status, resp.read()
  finally:
    conn.close()


def test_malformed_requests_get_4xx():
  with bounded_server() as (_, port):
    deep = b"[" * 200_000
    cases = [("POST", deep, None, 400, b"nested too deeply"), ("POST", b"\xff\xfe{", None, 400, b"not valid JSON"),
             ("PUT", b"{}", None, 405, b"not allowed"), ("DELETE", None, None, 405, b"not allowed"),
             ("POST", b"{}", {
                 "Content-Length": "abc"
             }, 400, b"Content-Length")]
    for method, body, headers, status, message in cases:
      got, reply = _request(port, method, body, headers)
      assert got == status and message in reply, (method, got, reply)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.putrequest("POST", "/retrieve")
    conn.endheaders()  # No Content-Length at all.
    assert conn.getresponse().status == 411
    conn.close()


def test_stalled_clients_neither_exhaust_threads_nor_block_a_real_request():
  with bounded_server(max_threads=8, request_timeout_s=1.0) as (srv, port):
    stalled = []
    for _ in range(40):  # Slowloris: a request line, then nothing.
      s = socket.create_connection(("127.0.0.1", port), timeout=5)
      s.sendall(b"POST /retrieve HTTP/1.1\r\nHost: x\r\n")
      stalled.append(s)
    start = time.monotonic()
    client = search_lib.HttpRetrieverBackend(f"http://127.0.0.1:{port}", timeout_s=2, retries=4, backoff_s=0.3)
    assert client.search(["legit"], 1)[0][0].text == "legit"
    assert time.monotonic() - start < 6
    assert srv.refused > 0  # Beyond max_threads, connections got 503 instead of a thread each.
    time.sleep(1.5)
    for s in stalled:  # Every stalled connection was cut at its deadline, or refused at once with a 503.
      assert _read_to_end(s) in (b"", b"503")
      s.close()
    assert threading.active_count() < 30  # No thread per stalled client.


def _read_to_end(sock):
  sock.settimeout(3)
  data = b""
  try:
    while chunk := sock.recv(1 << 16):
      data += chunk
  except ConnectionResetError:
    pass
  return data[9:12] if data else b""


def test_loopback_load_without_resets():
  with bounded_server(max_threads=16) as (_, port):
    body = json.dumps({"queries": ["q"], "topk": 1}).encode()

    def one(_):
      try:
        return _request(port, "POST", body, {"Content-Type": "application/json"}, timeout=20)[0]
      except OSError as e:
        return type(e).__name__

    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(100) as pool:
      statuses = list(pool.map(one, range(200)))
    assert time.monotonic() - start < 60
  assert set(statuses) <= {200, 503}, [s for s in statuses if s not in (200, 503)][:5]
  assert statuses.count(200) >= 100
