"""Reward throughput: jitted batch ops vs the paper's per-sample Python reward functions.

Both sides score the same 4096 synthetic step-wise trajectories (search and coding agents, all
four step types, some malformed) with the paper's format + accuracy rewards. The peer is the
paper's rules as per-sample Python (varft.rewards.reference, the paper's regexes; its query
similarity encodes each query pair separately, as the paper's code does). Ours is the host
adapter (`prepare_reward_inputs`) plus the jitted ops (`compute_rewards`), timed separately and
together. Medians over --runs; compile time reported once.

  python benchmarks/rewards_throughput.py [--n 4096] [--runs 5] [--embedder fake|minilm|both]
"""
import argparse
import hashlib
import statistics
import time

import jax
import numpy as np

from varft import rewards
from varft.rewards import reference

WORDS = ("the", "red", "tower", "river", "Paris", "1945", "lego", "brand", "meaning", "play", "well", "image",
         "rotated", "dark", "crop", "answer", "search", "city", "中文", "north", "museum", "king", "year")
PROBLEMS = ("rotation90", "rotation180", "dark", "overexposure", "blur", "noise", "crop", "none")
WEIGHTS = (("accuracy", 1.0), ("format", 1.0))


class HashEmbedder:
  """Cheap deterministic embeddings (bag of word hashes) to time the rule machinery alone."""
  dim = 384

  def __call__(self, texts):
    out = np.zeros((len(texts), self.dim), np.float32)
    for i, text in enumerate(texts):
      for word in text.split():
        out[i, hashlib.blake2b(word.encode(), digest_size=4).digest()[0] * 3 % self.dim] += 1.0
      out[i] /= max(np.linalg.norm(out[i]), 1e-6)
    return out


def make_batch(n, seed=0):
  """(completions, references, tasks, step types) with realistic lengths and ~20% format damage."""
  rng = np.random.default_rng(seed)
  words = lambda k: " ".join(rng.choice(WORDS, size=k))
  completions, refs = [], []
  for i in range(n):
    task = "search" if i % 2 == 0 else "coding"
    step = rng.choice(["answer", "search"] if task == "search" else ["answer", "code", "problem"])
    think = f"<think>{words(int(rng.integers(20, 80)))}</think>\n"
    if step == "answer":
      gold = words(int(rng.integers(1, 5)))
      sol, body = f"<answer>{gold}</answer>", f"<answer>{words(int(rng.integers(1, 6)))}</answer>"
    elif step == "search":
      sol, body = f"<search>{words(5)}</search>", f"<search>{words(int(rng.integers(3, 9)))}</search>"
    elif step == "code":
      sol = "<code>```python\nimg = cv2.imread('path_to_input_image.jpg')\n```</code>"
      body = f"<code>\n```python\nimport cv2\nimg = cv2.rotate(img, {words(3)})\n```\n</code>"
    else:
      pick = lambda: "{" + ", ".join(f"'{p}'" for p in rng.choice(PROBLEMS, size=int(rng.integers(1, 3)))) + "}"
      sol, body = f"<problem>{pick()}</problem>", f"<problem>{pick()}</problem>"
    text = think + body
    if rng.random() < 0.2:  # damage: a repeated or stray tag, or a missing think
      text = rng.choice([text + "<think>", text.replace("<think>", ""), text + " <answer>x</answer>"])
    completions.append(text)
    refs.append({"solution": f"<think>reason</think>{sol}", "task": task})
  return completions, refs


def paper_rewards(completions, refs, embedder):
  """Per-sample Python, as the paper's trainer calls its reward functions."""

  def similarity(a, b):
    x, y = embedder([a])[0], embedder([b])[0]
    return float(np.dot(x, y) / max(np.linalg.norm(x) * np.linalg.norm(y), 1e-8))

  totals = []
  for text, ref in zip(completions, refs):
    task, sol = ref["task"], ref["solution"]
    step = reference.step_type_of(sol, task)
    acc = reference.accuracy_reward(text, task, step, answers=[reference.extract_tag(sol, "answer")],
                                    query=reference.extract_tag(sol, "search"),
                                    problems=reference.extract_problems(sol), similarity=similarity)
    totals.append(acc + reference.format_reward(text, task, step))
  return np.asarray(totals)


def ours(completions, refs, embedder):
  t0 = time.perf_counter()
  arrays = rewards.prepare_reward_inputs(completions, refs, names=[n for n, _ in WEIGHTS], embedder=embedder)
  t1 = time.perf_counter()
  total, _ = rewards.compute_rewards(arrays, WEIGHTS)
  total = jax.block_until_ready(total)
  t2 = time.perf_counter()
  return np.asarray(total)[:len(completions)], t1 - t0, t2 - t1


def run(embedder_name, n, runs):
  if embedder_name == "minilm":
    embedder = rewards.default_embedder()
  else:
    embedder = HashEmbedder()
  completions, refs = make_batch(n)
  t0 = time.perf_counter()
  first, _, _ = ours(completions, refs, embedder)  # compiles
  compile_s = time.perf_counter() - t0
  peer_s, host_s, device_s = [], [], []
  for _ in range(runs):
    t0 = time.perf_counter()
    expected = paper_rewards(completions, refs, embedder)
    peer_s.append(time.perf_counter() - t0)
    got, h, d = ours(completions, refs, embedder)
    host_s.append(h)
    device_s.append(d)
  max_diff = float(np.max(np.abs(got - expected)))
  peer, host, device = (statistics.median(x) for x in (peer_s, host_s, device_s))
  print(f"\n[{embedder_name} embedder] {n} trajectories, median of {runs} runs, {jax.devices()[0].platform}; "
        f"max |ours - paper| = {max_diff:.2e}; first call incl. compile {compile_s:.2f} s")
  print(f"{'':28}{'seconds':>10}{'traj/s':>12}{'paper / ours':>14}")
  for name, secs in (("paper per-sample Python", peer), ("ours: host adapter", host), ("ours: jitted ops", device),
                     ("ours: host + jitted", host + device)):
    print(f"{name:28}{secs:>10.4f}{n / secs:>12.0f}{peer / secs:>13.1f}x", flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--n", type=int, default=4096)
  parser.add_argument("--runs", type=int, default=5)
  parser.add_argument("--embedder", choices=("fake", "minilm", "both"), default="both")
  args = parser.parse_args()
  for name in (("fake", "minilm") if args.embedder == "both" else (args.embedder,)):
    run(name, args.n, args.runs)


if __name__ == "__main__":
  main()
