"""A scriptable loopback HTTP server standing in for Serper and Search-R1 retrievers in tests."""
import contextlib
import http.server
import json
import threading
import time


class FakeService:
  """Replies to POSTs according to `mode`: 'ok', '500', '400', 'slow', 'garbage', 'flaky' (500 for the first
  `fail_first` requests, then ok). Records every request (path, headers, JSON body)."""

  def __init__(self, reply_fn, mode="ok", fail_first=0, delay_s=2.0):
    self.reply_fn = reply_fn
    self.mode = mode
    self.fail_first = fail_first
    self.delay_s = delay_s
    self.requests = []
    self._lock = threading.Lock()

  def handle(self, path, headers, body):
    with self._lock:
      self.requests.append((path, {k.lower(): v for k, v in headers.items()}, body))
      n = len(self.requests)
    if self.mode == "500" or (self.mode == "flaky" and n <= self.fail_first):
      return 500, b'{"error": "boom"}'
    if self.mode == "400":
      return 400, b'{"error": "bad"}'
    if self.mode == "garbage":
      return 200, b"<html>not json"
    if self.mode == "slow":
      time.sleep(self.delay_s)
    return 200, json.dumps(self.reply_fn(path, body)).encode()


@contextlib.contextmanager
def serve(service):
  """Runs `service` on 127.0.0.1:<ephemeral>; yields the base URL."""

  class Handler(http.server.BaseHTTPRequestHandler):

    def log_message(self, *args):
      pass

    def do_POST(self):  # pylint: disable=invalid-name
      raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
      try:
        body = json.loads(raw)
      except ValueError:
        body = None
      code, data = service.handle(self.path, self.headers, body)
      try:
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
      except (BrokenPipeError, ConnectionResetError):  # The client gave up (timeout tests).
        pass

  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
  server.daemon_threads = True
  thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{server.server_address[1]}"
  finally:
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def serper_reply(path, body):
  """Serper-style: one {"organic": [...]} per query object in the (list) body."""
  assert path == "/search"
  return [{
      "organic": [{
          "title": f"{q['q']} title {i}",
          "link": f"https://example.com/{i}",
          "snippet": f"snippet {i} about {q['q']}"
      } for i in range(q["num"] + 2)]
  } for q in body]


def retriever_reply(path, body):
  """Search-R1-style /retrieve reply with `"Title"\\ntext` contents."""
  assert path == "/retrieve"
  return {
      "result": [[{
          "document": {
              "id": str(i),
              "contents": f'"Doc {i}"\nabout {q}'
          },
          "score": 1.0 / (i + 1)
      } for i in range(body["topk"])] for q in body["queries"]]
  }
