"""The web search backends: Serper (the paper's search tool) and Search-R1-compatible `/retrieve` services, over
one JSON POST client that retries with backoff, honours a request rate limit, bounds each attempt's total time
(connect, send, every read: a service dripping bytes cannot hold a call) and the size of a reply, and raises
`search.SearchError` when a service fails. Built by `search.make_search_backend`."""
import http.client
import json
import os
import random
import socket
import threading
import time
import urllib.parse

from varft.tools.search_types import Doc, SearchBackend, SearchError, doc_from_record


class RateLimiter:
  """Spaces request starts at least 1/qps apart across threads (qps <= 0 disables it)."""

  def __init__(self, qps):
    self.interval = 1.0 / qps if qps and qps > 0 else 0.0
    self._next = 0.0
    self._lock = threading.Lock()

  def wait(self):
    if not self.interval:
      return
    with self._lock:
      now = time.monotonic()
      start = max(now, self._next)
      self._next = start + self.interval
    time.sleep(max(0.0, start - now))


class _Retryable(Exception):
  pass


class _Deadline:
  """Shuts a connection's socket down when its total time is up, so that no read (headers included) outlives it:
  a socket timeout alone applies per read, and a service dripping bytes would hold the call for ever."""

  def __init__(self, conn, seconds):
    self.conn, self.expired = conn, threading.Event()
    self._timer = threading.Timer(seconds, self._expire)
    self._timer.daemon = True
    self._timer.start()

  def _expire(self):
    self.expired.set()
    if self.conn.sock is not None:
      try:
        socket.socket.shutdown(self.conn.sock, socket.SHUT_RDWR)  # The plain socket's, also under TLS.
      except OSError:
        pass

  def cancel(self):
    self._timer.cancel()


def _post_once(url, data, headers, timeout_s, max_reply_bytes):
  """One POST under a total deadline of `timeout_s`, reply capped at `max_reply_bytes`: (status, body)."""
  parts = urllib.parse.urlsplit(url)
  conn_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
  conn = conn_class(parts.hostname, parts.port, timeout=timeout_s)
  deadline = _Deadline(conn, timeout_s)
  try:
    conn.request("POST", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""), body=data, headers=headers)
    resp = conn.getresponse()
    length = resp.getheader("Content-Length", "")
    if length.isdigit() and int(length) > max_reply_bytes:
      raise SearchError(f"search service reply is larger than {max_reply_bytes >> 20} MB")
    body = bytearray()
    while chunk := resp.read(min(1 << 16, max_reply_bytes + 1 - len(body))):
      body += chunk
      if len(body) > max_reply_bytes:
        raise SearchError(f"search service reply is larger than {max_reply_bytes >> 20} MB")
    if deadline.expired.is_set():
      raise TimeoutError("total deadline")
    return resp.status, bytes(body)
  except (OSError, http.client.HTTPException):
    if deadline.expired.is_set():
      raise TimeoutError("total deadline") from None
    raise
  finally:
    deadline.cancel()
    conn.close()


def post_json(url, body, *, headers=None, timeout_s=10.0, retries=3, backoff_s=0.5, limiter=None,
              max_reply_bytes=64 << 20):
  """POSTs JSON and returns the decoded reply; each attempt has a total deadline of `timeout_s` and a reply cap.
  Retries timeouts, connection errors, 429/5xx and malformed replies with exponential backoff (+ jitter); raises
  SearchError once retries are spent, on other 4xx, or on a reply over the cap."""
  data = json.dumps(body).encode()
  headers = {"Content-Type": "application/json", **(headers or {})}
  last = "no attempt"
  for attempt in range(retries + 1):
    if attempt:
      time.sleep(backoff_s * (2 ** (attempt - 1)) * (1 + 0.25 * random.random()))
    if limiter:
      limiter.wait()
    try:
      status, raw = _post_once(url, data, headers, timeout_s, max_reply_bytes)
      if status == 429 or status >= 500:
        raise _Retryable(f"HTTP {status}")
      if status >= 300:
        raise SearchError(f"search service rejected the request: HTTP {status}")
      try:
        return json.loads(raw)
      except (ValueError, RecursionError):
        raise _Retryable(f"malformed JSON reply ({len(raw)} bytes)") from None
    except _Retryable as e:
      last = str(e)
    except (TimeoutError, ConnectionError, OSError, http.client.HTTPException) as e:
      last = "timeout" if isinstance(e, TimeoutError) or "timed out" in str(e) else (
          f"connection failed ({type(e).__name__})")
  raise SearchError(f"search service unavailable after {retries + 1} attempts: {last}")


class SerperBackend(SearchBackend):
  """Google results through serper.dev (the paper's search tool): title + snippet per organic result."""

  name = "serper"

  def __init__(self, api_key_env="SERPER_API_KEY", base_url="https://google.serper.dev", timeout_s=10.0, retries=3,
               backoff_s=0.5, max_qps=5.0, batch_size=20, extra_params=None, max_reply_mb=64):
    self.api_key = os.environ.get(api_key_env)
    if not self.api_key:
      raise ValueError(f"Serper search needs an API key in the environment variable {api_key_env}")
    self.url = base_url.rstrip("/") + "/search"
    self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
    self.batch_size = batch_size
    self.extra_params = dict(extra_params or {})
    self.limiter = RateLimiter(max_qps)
    self.max_reply_bytes = int(max_reply_mb) << 20

  def search(self, queries, k):
    out = []
    for start in range(0, len(queries), self.batch_size):
      chunk = list(queries[start:start + self.batch_size])
      reply = post_json(self.url, [{
          "q": q,
          "num": k,
          **self.extra_params
      } for q in chunk], headers={"X-API-KEY": self.api_key}, timeout_s=self.timeout_s, retries=self.retries,
                        backoff_s=self.backoff_s, limiter=self.limiter, max_reply_bytes=self.max_reply_bytes)
      if isinstance(reply, dict):
        reply = [reply]
      if not isinstance(reply, list) or len(reply) != len(chunk):
        raise SearchError("search service returned an unexpected reply")
      out += [self._docs(r, k) for r in reply]
    return out

  @staticmethod
  def _docs(reply, k):
    if not isinstance(reply, dict):
      raise SearchError("search service returned an unexpected reply")
    docs = []
    for item in reply.get("organic") or []:
      if isinstance(item, dict) and (item.get("snippet") or item.get("title")):
        docs.append(
            Doc(str(item.get("link", "")), str(item.get("title", "")), str(item.get("snippet", "")),
                1.0 / (1 + len(docs))))  # Rank-based: Serper returns no scores.
    return docs[:k]


class HttpRetrieverBackend(SearchBackend):
  """Client of a Search-R1-compatible retriever: POST {url} {"queries", "topk", "return_scores"}."""

  name = "http"

  def __init__(self, url, timeout_s=30.0, retries=3, backoff_s=0.5, max_qps=0.0, batch_size=512, max_reply_mb=64):
    self.url = url if url.rstrip("/").endswith("/retrieve") else url.rstrip("/") + "/retrieve"
    self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
    self.batch_size = batch_size
    self.limiter = RateLimiter(max_qps)
    self.max_reply_bytes = int(max_reply_mb) << 20

  def search(self, queries, k):
    out = []
    for start in range(0, len(queries), self.batch_size):
      chunk = list(queries[start:start + self.batch_size])
      reply = post_json(self.url, {
          "queries": chunk,
          "topk": k,
          "return_scores": True
      }, timeout_s=self.timeout_s, retries=self.retries, backoff_s=self.backoff_s, limiter=self.limiter,
                        max_reply_bytes=self.max_reply_bytes)
      rows = reply.get("result") if isinstance(reply, dict) else None
      if not isinstance(rows, list) or len(rows) != len(chunk):
        raise SearchError("retriever returned an unexpected reply")
      try:
        out += [[self._doc(item) for item in row][:k] for row in rows]
      except (ValueError, TypeError, AttributeError):
        raise SearchError("retriever returned malformed documents") from None
    return out

  @staticmethod
  def _doc(item):
    if isinstance(item, dict) and "document" in item:
      return doc_from_record(item["document"], score=item.get("score", 0.0))
    return doc_from_record(item)
