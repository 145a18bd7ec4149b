"""Runs tool calls for the rollout engine: as they arrive, concurrently, bounded, and without ever raising.

Every failure (sandbox error, timeout, search service down, HTTP 500, malformed reply, unknown tool) becomes an
`Observation` with ok=False and a short error the model reads; a training step never dies on a tool. A call past
its deadline (`call_timeout_s`) gets a timeout observation at the deadline, whatever its tool is still doing: it
costs its own trajectory only.

  executor = ToolExecutor({'search': {'name': 'bm25', 'index_dir': ...}, 'code': {'timeout_s': 10}})
  future = executor.submit(ToolCall('code', text, images))  # concurrent.futures.Future[Observation]
  observations = executor.execute([ToolCall('search', 'who painted ...'), ToolCall('code', text, images)])
  metrics = executor.stats()
"""
import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
from typing import Any

from PIL import Image

from varft.tools import code as code_lib
from varft.tools import search as search_lib

log = logging.getLogger(__name__)
KINDS = ("search", "code")
MAX_STUCK_SEARCHES = 8


@dataclasses.dataclass
class ToolCall:
  """One tool request: kind 'search' (payload = query) or 'code' (payload = program or the model's text)."""
  kind: str
  payload: str
  images: dict[str, Image.Image] | None = None  # For code: file name -> image (path_to_input_image.jpg).
  call_id: Any = None


@dataclasses.dataclass
class Observation:
  """What the model sees back: text (search results / program output + error) and maybe an image."""
  text: str
  image: Image.Image | None
  ok: bool
  error: str | None
  wall_s: float
  kind: str
  call_id: Any = None


@dataclasses.dataclass(frozen=True)
class ExecutorConfig:
  max_workers: int = 8  # Concurrent tool calls (code calls are also bounded by the sandbox's slots).
  topk: int = 4  # Documents per search (the paper shows the top 4).
  search_format: str = "paper"  # 'paper' or 'search_r1'.
  search_timeout_s: float = 60.0  # Wall limit for one batch of searches.
  code_timeout_s: float | None = None  # Per-call wall limit; default: the sandbox's.
  max_doc_chars: int = 1000
  max_query_chars: int = 1000
  max_text_chars: int = 4000  # Cap on the text of one code observation.
  call_timeout_s: float = 120.0  # Wall limit for one submitted call (or batch of searches), queueing included.


class ToolExecutor:
  """Dispatches tool calls to the search backend and the code sandbox; thread-safe; see module doc."""

  def __init__(self, config=None, *, search_backend=None, sandbox=None):
    cfg = dict(config or {})
    search_cfg, code_cfg = cfg.pop("search", None), cfg.pop("code", None)
    known = {f.name for f in dataclasses.fields(ExecutorConfig)}
    if set(cfg) - known:
      raise ValueError(f"unknown tool executor config keys {sorted(set(cfg) - known)}; known: "
                       f"{sorted(known | {'search', 'code'})}")
    self.config = ExecutorConfig(**cfg)
    search_lib.format_results([], self.config.search_format)  # Fails early on an unknown format.
    self.search_backend = search_backend or (search_lib.make_search_backend(search_cfg) if search_cfg else None)
    self._owns_sandbox = sandbox is None and code_cfg is not None
    self.sandbox = sandbox or (code_lib.CodeSandbox(code_cfg) if code_cfg is not None else None)
    self._pool = concurrent.futures.ThreadPoolExecutor(self.config.max_workers, thread_name_prefix="tool")
    self._lock = threading.Lock()
    self._stats = collections.defaultdict(float)
    self._stuck = 0  # Search requests past their deadline whose threads have not returned yet.

  def submit(self, call: ToolCall) -> concurrent.futures.Future:
    """Starts one call now; its future always gets an Observation (never an exception), at the latest at the
    call's deadline."""
    return self._start(self._run_one, [call])[0]

  def execute(self, calls):
    """Runs all calls (searches batched into one backend request) and returns one Observation per call, in
    order. Never raises for a failing tool."""
    calls = list(calls)
    searches = [i for i, c in enumerate(calls) if c.kind == "search"]
    futures = dict(zip(searches, self._start(self._run_searches, [calls[i] for i in searches]) if searches else []))
    for i, call in enumerate(calls):
      if i not in futures:
        futures[i] = self.submit(call)
    return [futures[i].result() for i in range(len(calls))]

  def _start(self, run, calls):
    """Runs `run(calls) -> observations` on the pool; one future per call, resolved by the run or by the deadline,
    whichever comes first (each observation recorded in the stats once)."""
    futures = [concurrent.futures.Future() for _ in calls]
    deadline = self.config.call_timeout_s

    def resolve(observations):
      for future, obs in zip(futures, observations):
        with self._lock:
          if future.done():
            continue
          future.set_result(obs)
        self._record(obs)

    def work():
      try:
        observations = run(calls)
      except Exception as e:  # pylint: disable=broad-except
        log.exception("%s tool crashed", calls[0].kind)
        observations = [self._failure(c, f"{c.kind} tool failed: {type(e).__name__}", 0.0) for c in calls]
      resolve(observations)

    timer = threading.Timer(
        deadline, lambda: resolve([self._failure(c, f"timed out after {deadline:g} s", deadline) for c in calls]))
    timer.daemon = True
    timer.start()
    futures[-1].add_done_callback(lambda _: timer.cancel())
    self._pool.submit(work)
    return futures

  def _run_one(self, calls):
    call, = calls
    if call.kind == "search":
      return self._run_searches(calls)
    if call.kind == "code":
      return [self._run_code(call)]
    return [self._failure(call, f"unknown tool {call.kind!r}; use <search> or <code>", 0.0)]

  def _failure(self, call, error, wall_s):
    return Observation(f"Error: {error}", None, False, error, wall_s, call.kind, call.call_id)

  def _run_code(self, call):
    start = time.monotonic()
    if self.sandbox is None:
      return self._failure(call, "the code tool is not enabled", 0.0)
    r = self.sandbox.run(call.payload, call.images, timeout_s=self.config.code_timeout_s)
    parts = [r.stdout.strip()] if r.stdout.strip() else []
    if r.error:
      parts.append(f"Error: {r.error}")
    text = "\n".join(parts)
    if len(text) > self.config.max_text_chars:
      text = text[:self.config.max_text_chars] + " ..."
    return Observation(text, r.output_image, r.ok, r.error, time.monotonic() - start, "code", call.call_id)

  def _run_searches(self, calls):
    """One batched backend request for all valid queries, under the search wall limit."""
    start = time.monotonic()
    c = self.config
    out = [None] * len(calls)
    todo = []
    for j, call in enumerate(calls):
      query = " ".join(str(call.payload or "").split())
      if self.search_backend is None:
        out[j] = self._failure(call, "the search tool is not enabled", 0.0)
      elif not query:
        out[j] = self._failure(call, "empty search query", 0.0)
      else:
        todo.append((j, query[:c.max_query_chars]))
    if todo:
      rows, error = self._search_with_deadline([q for _, q in todo], c.topk)
      if error is None and len(rows) != len(todo):
        error = "search backend returned the wrong number of result lists"
      wall = time.monotonic() - start
      for n, (j, _) in enumerate(todo):
        if error:
          out[j] = self._failure(calls[j], error, wall)
        else:
          text = search_lib.format_results(rows[n][:c.topk], c.search_format, c.max_doc_chars)
          out[j] = Observation(text, None, True, None, wall, "search", calls[j].call_id)
    return out

  def _search_with_deadline(self, queries, k):
    """(rows, None) or (None, error). Each request runs in a thread of its own: past the deadline it is abandoned
    (it ends when the backend's own timeout fires) rather than holding a worker that the next batches would queue
    behind; while MAX_STUCK_SEARCHES are still out, new batches fail at once instead of piling up more."""
    c = self.config
    with self._lock:
      if self._stuck >= MAX_STUCK_SEARCHES:
        return None, f"search backend is not answering ({self._stuck} requests still pending)"
    box, done = {}, threading.Event()

    def work():
      try:
        box["rows"] = self.search_backend.search(queries, k)
      except Exception as e:  # noqa: BLE001 (handed to the caller's thread, which reports it)
        box["error"] = e
      finally:
        with self._lock:
          done.set()
          if box.get("abandoned"):
            self._stuck -= 1

    threading.Thread(target=work, name="tool-search", daemon=True).start()
    done.wait(c.search_timeout_s)
    with self._lock:
      if not done.is_set():
        box["abandoned"] = True
        self._stuck += 1
        self._stats["search/abandoned"] += 1
        return None, f"search timed out after {c.search_timeout_s:g} s"
    error = box.get("error")
    if error is None:
      return box["rows"], None
    if isinstance(error, search_lib.SearchError):
      return None, str(error)
    log.error("search backend crashed", exc_info=error)
    return None, f"search failed: {type(error).__name__}"

  def _record(self, obs):
    kind = obs.kind if obs.kind in KINDS else "other"
    with self._lock:
      s = self._stats
      s[f"{kind}/calls"] += 1
      s[f"{kind}/errors"] += not obs.ok
      s[f"{kind}/timeouts"] += bool(obs.error) and ("timed out" in obs.error or obs.error.startswith("timeout"))
      s[f"{kind}/wall_s_sum"] += obs.wall_s
      s[f"{kind}/wall_s_max"] = max(s[f"{kind}/wall_s_max"], obs.wall_s)

  def stats(self, reset=False):
    """Metrics since the last reset: per kind calls, errors, timeouts, mean/max wall seconds, error rate; plus
    cache hits/misses of a cached search backend. Keys look like 'tools/code/errors'."""
    with self._lock:
      s = dict(self._stats)
      if reset:
        self._stats.clear()
    out = {f"tools/{k}": v for k, v in s.items()}
    for kind in ("search", "code", "other"):
      n = s.get(f"{kind}/calls", 0)
      if n:
        out[f"tools/{kind}/wall_s_mean"] = s[f"{kind}/wall_s_sum"] / n
        out[f"tools/{kind}/error_rate"] = s[f"{kind}/errors"] / n
    backend = self.search_backend
    if isinstance(backend, search_lib.CachedBackend):
      out["tools/search/cache_hits"] = backend.hits
      out["tools/search/cache_misses"] = backend.misses
    return out

  def close(self):
    """Stops the worker threads and a sandbox it created: waits for running programs (they are time-limited);
    a search that already timed out is left to finish on its own (its backend has its own timeout)."""
    self._pool.shutdown(wait=True)
    if self._owns_sandbox:
      self.sandbox.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
