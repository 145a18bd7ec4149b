"""Search tool: BM25 queries/s on a generated 100k-document corpus; varft's backend vs bm25s used directly.

The corpus is synthetic but shaped like text: a 30k-word vocabulary drawn with a Zipf law, 3-word titles,
~60-word bodies. Queries take 4 words from a random document (so they have answers). Sides, same index:
  bm25s_direct   bm25s.tokenize + BM25.retrieve, k=4 (the peer: the library with nothing around it);
  varft_bm25     BM25Backend.search (tokenize, retrieve, Doc objects with scores);
  varft_http     the same index behind `retrieval_server` on loopback, through HttpRetrieverBackend.
Each is measured in batches of `--batch` queries and one query at a time.

    python benchmarks/tools_bm25.py [--docs 100000] [--queries 2000] [--batch 256] [--repeats 3]

Prints the median queries/s over `--repeats` rounds, ratios peer/ours (>1: we are slower), and build times.
"""
import argparse
import json
import os
import statistics
import tempfile
import threading
import time

import bm25s
import numpy as np

from varft.tools import retrieval_server
from varft.tools import search as search_lib


def make_corpus(path, n_docs, seed=0):
  rng = np.random.default_rng(seed)
  letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
  vocab = ["".join(rng.choice(letters, size=rng.integers(3, 10))) for _ in range(30000)]
  ranks = np.minimum(rng.zipf(1.2, size=n_docs * 70) - 1, len(vocab) - 1)
  words = [vocab[i] for i in ranks]
  docs, pos = [], 0
  with open(path, "w") as f:
    for i in range(n_docs):
      length = int(rng.integers(40, 80))
      body = words[pos:pos + length]
      pos += length
      title = " ".join(body[:3])
      docs.append(body)
      f.write(json.dumps({"id": str(i), "title": title, "text": " ".join(body)}) + "\n")
  queries = []
  for _ in range(4 * n_docs // 100):
    body = docs[int(rng.integers(n_docs))]
    queries.append(" ".join(rng.choice(body, size=4, replace=False)))
  return queries


def qps(fn, queries, batch):
  t = time.perf_counter()
  for i in range(0, len(queries), batch):
    fn(queries[i:i + batch])
  return len(queries) / (time.perf_counter() - t)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--docs", type=int, default=100_000)
  parser.add_argument("--queries", type=int, default=2000)
  parser.add_argument("--single", type=int, default=200, help="queries sent one at a time")
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    corpus = os.path.join(tmp, "corpus.jsonl")
    queries = make_corpus(corpus, args.docs)
    queries = (queries * (args.queries // len(queries) + 1))[:args.queries]

    t = time.perf_counter()
    ours = search_lib.build_index(corpus, os.path.join(tmp, "index"), "bm25")
    build_ours = time.perf_counter() - t
    t = time.perf_counter()
    ours = search_lib.load_index(os.path.join(tmp, "index"))
    load_ours = time.perf_counter() - t

    docs = search_lib.read_corpus(corpus)
    t = time.perf_counter()
    peer = bm25s.BM25()
    peer.index(bm25s.tokenize([f"{d.title} {d.text}" for d in docs], stopwords="en", show_progress=False),
               show_progress=False)
    build_peer = time.perf_counter() - t

    def peer_search(qs):
      tokens = bm25s.tokenize(qs, stopwords="en", return_ids=False, show_progress=False)
      return peer.retrieve(tokens, k=4, show_progress=False)

    server = retrieval_server.make_server(ours, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = search_lib.HttpRetrieverBackend(f"http://127.0.0.1:{server.server_address[1]}", timeout_s=120)

    sides = {
        "bm25s_direct": peer_search,
        "varft_bm25": lambda qs: ours.search(qs, 4),
        "varft_http": lambda qs: client.search(qs, 4)
    }
    assert [d.id for d in ours.search(queries[:1], 4)[0]] == [str(i) for i in peer_search(queries[:1])[0][0]]
    rows = {name: [] for name in sides}
    for _ in range(args.repeats):
      for name, fn in sides.items():
        rows[name].append((qps(fn, queries, args.batch), qps(fn, queries[:args.single], 1)))
    server.shutdown()
    server.server_close()
  med = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for k, v in rows.items()}
  peer_b, peer_1 = med["bm25s_direct"]
  report = {
      "docs": args.docs,
      "cpus": os.cpu_count(),
      "load_avg_1m": os.getloadavg()[0],
      "build_s": {
          "varft": round(build_ours, 2),
          "bm25s_direct": round(build_peer, 2)
      },
      "load_s_varft": round(load_ours, 2)
  }
  for name, (qb, q1) in med.items():
    report[name] = {f"qps_batch{args.batch}": round(qb, 1), "qps_single": round(q1, 1)}
    if name != "bm25s_direct":
      report[name].update(ratio_batch=round(peer_b / qb, 3), ratio_single=round(peer_1 / q1, 3))
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  main()
