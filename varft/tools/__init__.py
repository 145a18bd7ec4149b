"""Host-side tools the policy calls during rollouts.

  code.py             CodeSandbox: model-written Python in an isolated, throw-away sandbox (bubblewrap/unshare).
  sandbox_launch.py   the sandbox's view of the host (interpreter layout, mounts), command lines, uid blocks.
  sandbox_process.py  one sandbox process: limits, start-up check, the call over stdin and the result pipe.
  sandbox_init.py     the trusted init that runs inside each sandbox (its source is sent in over stdin).
  cgroups.py          per-slot cgroups capping a call's total memory where the host allows it.
  search.py           search backends (bm25, dense, serper, http) and the observation formats.
  search_web.py       the web backends (serper, http) and their bounded JSON POST client.
  search_types.py     Doc, SearchError, SearchBackend: what every backend shares.
  retrieval_server.py Search-R1-compatible /retrieve server over a local index.
  executor.py         ToolExecutor: a batch of ToolCalls -> Observations, concurrent, never raising.
"""
