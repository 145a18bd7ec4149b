"""A Search-R1-compatible retrieval server, so that all hosts of a pod share one local index.

  python -m varft.tools.retrieval_server --index DIR --port N [--host 0.0.0.0]

POST /retrieve  {"queries": [str, ...], "topk": int, "return_scores": bool}
  -> {"result": [[{"document": {"id", "title", "text", "contents"}, "score": float}, ...], ...]}
     (without return_scores each row holds the bare documents; contents = '"Title"\\ntext' as in Search-R1).
GET /health -> {"status": "ok", "kind": ..., "num_docs": ...}
Malformed requests get a 4xx with {"error": ...} (400, or 405/404/411/413); a failing backend gets HTTP 500.

Served to a pod with `--host 0.0.0.0`, any peer can reach it, so it is bounded: at most `max_threads` connections
are handled at once (more get 503 with Retry-After, which the client retries), each request must arrive whole
within `request_timeout_s` and a kept-alive connection may idle `idle_timeout_s`, and the listen backlog is 256.
"""
import argparse
import http.server
import json
import logging
import socket
import sys
import threading
import time

from varft.tools import search as search_lib

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 1 << 20


def _document(doc):
  return {"id": doc.id, "title": doc.title, "text": doc.text, "contents": f'"{doc.title}"\n{doc.text}'}


def _parse_request(body, max_topk, max_queries):
  try:
    req = json.loads(body)
  except ValueError:
    raise ValueError("request body is not valid JSON") from None
  except RecursionError:
    raise ValueError("request JSON is nested too deeply") from None
  if not isinstance(req, dict):
    raise ValueError("request must be a JSON object")
  queries = req.get("queries")
  if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
    raise ValueError("'queries' must be a list of strings")
  if len(queries) > max_queries:
    raise ValueError(f"at most {max_queries} queries per request")
  topk = req.get("topk", 3)
  if not isinstance(topk, int) or isinstance(topk, bool) or not 1 <= topk <= max_topk:
    raise ValueError(f"'topk' must be an integer in [1, {max_topk}]")
  return queries, topk, bool(req.get("return_scores", False))


class _Watchdog:
  """One thread for all connections: shuts a connection down once its deadline passes (a request that does not
  arrive whole in time, whatever the per-read timeout), and closes refused connections after a short linger."""

  def __init__(self):
    self._deadlines = {}  # socket -> (deadline, close instead of shutting down)
    self._lock = threading.Lock()
    self._stop = threading.Event()
    threading.Thread(target=self._run, name="retrieval-watchdog", daemon=True).start()

  def stop(self):
    self._stop.set()

  def watch(self, sock, seconds, close=False):
    with self._lock:
      self._deadlines[sock] = (time.monotonic() + seconds, close)

  def forget(self, sock):
    with self._lock:
      self._deadlines.pop(sock, None)

  def _run(self):
    while not self._stop.wait(0.05):
      now = time.monotonic()
      with self._lock:
        due = [(s, close) for s, (t, close) in self._deadlines.items() if t <= now]
        for s, _ in due:
          del self._deadlines[s]
      for s, close in due:
        try:
          s.close() if close else s.shutdown(socket.SHUT_RDWR)
        except OSError:
          pass


class _BoundedServer(http.server.ThreadingHTTPServer):
  """ThreadingHTTPServer with a cap on concurrent connections, per-request deadlines and a larger backlog."""
  daemon_threads = True
  request_queue_size = 256

  def __init__(self, address, handler, max_threads, request_timeout_s):
    self.slots = threading.BoundedSemaphore(max_threads)
    self.request_timeout_s = request_timeout_s
    self.watchdog = _Watchdog()
    self.refused = 0
    super().__init__(address, handler)

  def server_close(self):
    super().server_close()
    self.watchdog.stop()

  def process_request(self, request, client_address):
    if not self.slots.acquire(blocking=False):
      self._refuse(request)
      return
    self.watchdog.watch(request, self.request_timeout_s)
    try:
      super().process_request(request, client_address)
    except BaseException:
      self.slots.release()
      raise

  def process_request_thread(self, request, client_address):
    try:
      super().process_request_thread(request, client_address)
    finally:
      self.watchdog.forget(request)
      self.slots.release()

  def _refuse(self, request):
    """503 without a thread: read what already arrived, answer, and close after a linger (closing at once with
    the request unread would reset the connection before the client reads the answer)."""
    self.refused += 1
    body = b'{"error": "server busy; retry"}'
    try:
      request.setblocking(False)
      try:
        request.recv(1 << 16)
      except BlockingIOError:
        pass
      request.send(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                   b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
      request.shutdown(socket.SHUT_WR)
    except OSError:
      request.close()
      return
    self.watchdog.watch(request, 1.0, close=True)


def make_server(backend, host="127.0.0.1", port=0, max_topk=100, max_queries=4096, info=None, max_threads=64,
                request_timeout_s=30.0, idle_timeout_s=10.0):
  """A bounded threading HTTP server serving `backend` (port 0 picks a free port: see server.server_address)."""

  class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = idle_timeout_s  # Per read: a kept-alive connection that sends nothing more is closed.

    def log_message(self, fmt, *args):  # Route access logs through logging, not stderr.
      log.debug("%s " + fmt, self.address_string(), *args)

    def _reply(self, code, payload):
      data = json.dumps(payload, ensure_ascii=False).encode()
      self.send_response(code)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(data)))
      self.end_headers()
      self.wfile.write(data)
      self.server.watchdog.watch(self.connection, request_timeout_s)  # The next request's own deadline.

    def do_GET(self):  # pylint: disable=invalid-name
      if self.path.rstrip("/") == "/health":
        self._reply(200, {"status": "ok", **(info or {})})
      else:
        self._reply(404, {"error": f"no such endpoint {self.path}; use POST /retrieve"})

    def _not_allowed(self):
      self.close_connection = True
      self._reply(405, {"error": f"method {self.command} not allowed; use POST /retrieve or GET /health"})

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_TRACE = do_CONNECT = _not_allowed

    def do_POST(self):  # pylint: disable=invalid-name
      if self.path.rstrip("/") != "/retrieve":
        self._reply(404, {"error": f"no such endpoint {self.path}; use POST /retrieve"})
        return
      try:
        length = int(self.headers.get("Content-Length", "-1"))
      except ValueError:
        length = -2
      if not 0 <= length <= MAX_BODY_BYTES:
        self.close_connection = True
        code, reason = ((413, "request body over 1 MB") if length > MAX_BODY_BYTES else
                        (411, "Content-Length required") if length == -1 else (400, "bad Content-Length"))
        self._reply(code, {"error": reason})
        return
      try:
        queries, topk, with_scores = _parse_request(self.rfile.read(length), max_topk, max_queries)
      except ValueError as e:
        self._reply(400, {"error": str(e)})
        return
      try:
        rows = backend.search(queries, topk)
      except Exception as e:  # pylint: disable=broad-except
        log.exception("retrieval failed")
        self._reply(500, {"error": f"retrieval failed: {type(e).__name__}"})
        return
      if with_scores:
        result = [[{"document": _document(d), "score": d.score} for d in row] for row in rows]
      else:
        result = [[_document(d) for d in row] for row in rows]
      self._reply(200, {"result": result})

  return _BoundedServer((host, port), Handler, max_threads, request_timeout_s)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--index", required=True, help="index directory from varft.tools.search.build_index")
  parser.add_argument("--port", type=int, default=8000)
  parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other hosts of the pod")
  parser.add_argument("--max-topk", type=int, default=100)
  parser.add_argument("--max-threads", type=int, default=64, help="connections handled at once; more get 503")
  parser.add_argument("--request-timeout", type=float, default=30.0, help="seconds for a request to arrive")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  backend = search_lib.load_index(args.index)
  server = make_server(backend, args.host, args.port, args.max_topk, info={
      "kind": backend.name,
      "num_docs": len(backend.docs)
  }, max_threads=args.max_threads, request_timeout_s=args.request_timeout)
  host, port = server.server_address[:2]
  log.info("serving %s index %s (%d docs) on http://%s:%d/retrieve", backend.name, args.index, len(backend.docs), host,
           port)
  print(f"listening on {host}:{port}", flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()
  return 0


if __name__ == "__main__":
  sys.exit(main())
