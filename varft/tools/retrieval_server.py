"""A Search-R1-compatible retrieval server, so that all hosts of a pod share one local index.

  python -m varft.tools.retrieval_server --index DIR --port N [--host 0.0.0.0]

POST /retrieve  {"queries": [str, ...], "topk": int, "return_scores": bool}
  -> {"result": [[{"document": {"id", "title", "text", "contents"}, "score": float}, ...], ...]}
     (without return_scores each row holds the bare documents; contents = '"Title"\\ntext' as in Search-R1).
GET /health -> {"status": "ok", "kind": ..., "num_docs": ...}
Bad requests get HTTP 400 with {"error": ...}; a failing backend gets HTTP 500.
"""
import argparse
import http.server
import json
import logging
import sys

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


def make_server(backend, host="127.0.0.1", port=0, max_topk=100, max_queries=4096, info=None):
  """A ThreadingHTTPServer serving `backend` (port 0 picks a free port: see server.server_address)."""

  class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # Route access logs through logging, not stderr.
      log.debug("%s " + fmt, self.address_string(), *args)

    def _reply(self, code, payload):
      data = json.dumps(payload, ensure_ascii=False).encode()
      self.send_response(code)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(data)))
      self.end_headers()
      self.wfile.write(data)

    def do_GET(self):  # pylint: disable=invalid-name
      if self.path.rstrip("/") == "/health":
        self._reply(200, {"status": "ok", **(info or {})})
      else:
        self._reply(404, {"error": f"no such endpoint {self.path}; use POST /retrieve"})

    def do_POST(self):  # pylint: disable=invalid-name
      if self.path.rstrip("/") != "/retrieve":
        self._reply(404, {"error": f"no such endpoint {self.path}; use POST /retrieve"})
        return
      try:
        length = int(self.headers.get("Content-Length", "0"))
      except ValueError:
        length = -1
      if not 0 <= length <= MAX_BODY_BYTES:
        self.close_connection = True
        self._reply(413 if length > MAX_BODY_BYTES else 400, {"error": "missing or oversized request body"})
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

  server = http.server.ThreadingHTTPServer((host, port), Handler)
  server.daemon_threads = True
  return server


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--index", required=True, help="index directory from varft.tools.search.build_index")
  parser.add_argument("--port", type=int, default=8000)
  parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other hosts of the pod")
  parser.add_argument("--max-topk", type=int, default=100)
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  backend = search_lib.load_index(args.index)
  server = make_server(backend, args.host, args.port, args.max_topk,
                       info={"kind": backend.name, "num_docs": len(backend.docs)})
  host, port = server.server_address[:2]
  log.info("serving %s index %s (%d docs) on http://%s:%d/retrieve", backend.name, args.index,
           len(backend.docs), host, port)
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
