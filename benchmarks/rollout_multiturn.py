"""Multi-turn agentic throughput: varft's batched rollout engine vs the paper's evaluation loop, same tiny model.

Workload: 64 search tasks, each with one 224x224 image. Every trajectory makes 3 tool turns and then answers: each
turn samples 24 free tokens followed by its action (`<search> q </search>`, the last turn `<answer> a </answer>`),
and each search is answered by a deterministic local tool (a fixed passage in the paper's `<information>` format).

* ours: `RolloutEngine.run` over all 64 tasks at once (one batch, the KV cache extended turn by turn, the image
  encoded once; continuous batching); the action tokens are forced through the sampler (a scripted policy,
  `tests.rollout.scripted`), the free tokens sampled.
* paper: the structure of Visual-ARFT's evaluation scripts: one task at a time; every turn re-renders the whole
  conversation with the chat template, re-tokenizes it, re-processes the image and calls transformers `generate`
  on the full prompt: 24 sampled tokens, then the action's tokens forced by a `LogitsProcessor` (decoded like
  ours, not appended as text), so both sides decode the same tokens per turn (checked).

The paper loop is sequential, so its per-task time is measured on `--paper-tasks` tasks and reported as tasks/s;
the sides alternate for `--repeats` rounds after a warm-up of each (medians). Also reported: our decode step time
and, for scale, a decode step's vocabulary-wide parts alone (the tied projection, the sampler's draw) in jitted loops
at batch 1 and 64.

    PYTHONPATH=. python benchmarks/rollout_multiturn.py [--tasks 64] [--paper-tasks 8] [--repeats 3]
"""
import argparse
import io
import json
import os
import statistics
import tempfile
import time

# One thread per side: on a shared 2-core machine torch's 2 OpenMP threads slow it down several times over.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import torch
from transformers import AutoTokenizer, LogitsProcessor, LogitsProcessorList, Qwen2VLImageProcessorPil

from tests import hf_tiny
from tests.rollout import scripted
from varft import prompts, rollout, sampling, sampling_draw
from varft.models.qwen25vl import config as config_lib
from varft.models.qwen25vl import hf
from varft.processing import chat
from varft.tools.executor import Observation

FREE_TOKENS = 24
TOOL_TURNS = 3
PASSAGE = "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France."


class LocalSearch:
  """A deterministic local tool: every query gets the same passage."""

  def execute(self, calls):
    return [
        Observation(prompts.search_observation([f"{c.payload}: {PASSAGE}"]), None, True, None, 0.0, "search", c.call_id)
        for c in calls
    ]


def action_text(turn: int) -> str:
  return f"<search> query {turn} </search>" if turn <= TOOL_TURNS else "<answer> Paris </answer>"


def action_ids(tokenizer) -> dict[int, list[int]]:
  """The token ids of each turn's action (the same ids forced on both sides)."""
  return {t: list(tokenizer.encode(action_text(t))) for t in range(1, TOOL_TURNS + 2)}


class ForceAfter(LogitsProcessor):
  """Forces `ids` once `free` tokens have been generated after a prompt of `prompt_len` tokens."""

  def __init__(self, prompt_len: int, free: int, ids):
    self.prompt_len, self.free, self.ids = prompt_len, free, list(ids)

  def __call__(self, input_ids, scores):
    step = input_ids.shape[1] - self.prompt_len - self.free
    if 0 <= step < len(self.ids):
      forced = torch.full_like(scores, -float("inf"))
      forced[:, self.ids[step]] = 0.0
      return forced
    return scores


def make_tasks(n: int):
  rng = np.random.default_rng(0)
  tasks = []
  for i in range(n):
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(buffer, format="PNG")
    tasks.append({
        "id": str(i),
        "task": "search",
        "question": f"Where was photo {i} taken?",
        "answers": ["Paris"],
        "images": [buffer.getvalue()]
    })
  return tasks


def our_engine(config, tokenizer, actions):
  forced = {t: [-1] * FREE_TOKENS + ids for t, ids in actions.items()}
  return scripted.ScriptedEngine(
      config, tokenizer, LocalSearch(),
      rollout.RolloutConfig(mode="multiturn", max_turns=TOOL_TURNS + 1, max_new_tokens=40, max_total_tokens=768,
                            length_buckets=(512, 768), chunk_buckets=(64,), patch_buckets=(256,),
                            image_max_pixels=224 * 224, temperature=1.0), script=lambda row, turn: forced[turn])


def our_run(engine, params, tasks, seeds):
  """One batched run; returns the seconds, the run's stats and how many runs were redrawn: a free token that
  happens to be a stop (EOS or a tag's end; ~1e-5 per token on the random model) ends its trajectory early, so that
  run would decode fewer tokens than the peer, and it is drawn again from the next seed."""
  for redrawn, seed in enumerate(seeds):
    start = time.perf_counter()
    stats = engine.run(params, tasks, jax.random.PRNGKey(seed), num_samples=1).stats
    seconds = time.perf_counter() - start
    if stats["stop_reasons"]["answer"] == len(tasks):
      assert stats["tool_calls"] == TOOL_TURNS * len(tasks)
      return seconds, stats, redrawn
  raise RuntimeError(f"every seed of {list(seeds)} stopped a trajectory early: {stats['stop_reasons']}")


def _loop_s(step, x, steps: int = 50) -> float:
  """Seconds per step of `step` (x -> x) run `steps` times in one jitted loop (buffers reused, as in the decode
  loop), median of 5 calls."""
  loop = jax.jit(lambda x: jax.lax.fori_loop(0, steps, lambda _, x: step(x), x))
  jax.block_until_ready(loop(x))
  times = []
  for _ in range(5):
    start = time.perf_counter()
    jax.block_until_ready(loop(x))
    times.append(time.perf_counter() - start)
  return statistics.median(times) / steps


def decode_floor_s(hidden: int, vocab: int, batch: int) -> dict[str, float]:
  """A decode step's two vocabulary-wide parts alone, f32, on this CPU: the tied projection (batch, hidden) x
  (vocab, hidden), and the sampler's draw over (batch, vocab) logits (temperature 1, full vocabulary)."""
  embed = jnp.ones((vocab, hidden), jnp.float32)

  def project(x):
    logits = jnp.einsum("bh,vh->bv", x, embed)
    return x + 1e-9 * logits[:, :hidden]

  config = sampling.SamplingConfig(temperature=1.0)

  def draw(carry):
    logits, rng = carry
    rng, key = jax.random.split(rng)
    token, logp = sampling_draw.sample(logits, key, config, jnp.full((batch,), -1, jnp.int32))
    return logits.at[:, 0].add(1e-9 * (token + logp)), rng

  logits = jax.random.normal(jax.random.PRNGKey(0), (batch, vocab))
  return {
      "vocab_matmul": _loop_s(project, jnp.ones((batch, hidden), jnp.float32)),
      "sampling": _loop_s(draw, (logits, jax.random.PRNGKey(1)))
  }


def paper_loop(hf_dir, torch_model, tasks, actions):
  """One task at a time; every turn re-encodes the whole conversation and calls generate (the paper's scripts).
  Returns the seconds and the tokens generated per task."""
  tokenizer = AutoTokenizer.from_pretrained(hf_dir)
  image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=224 * 224)
  tool = LocalSearch()
  start, generated = time.perf_counter(), 0
  for task in tasks:
    image = Image.open(io.BytesIO(task["images"][0])).convert("RGB")
    text_so_far = prompts.user_text(prompts.SEARCH_AGENT, task["question"])
    for turn in range(1, TOOL_TURNS + 2):
      messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text_so_far}]}]
      text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
      vision = image_processor(images=[image], return_tensors="pt")
      tokens = int(vision["image_grid_thw"].prod()) // 4
      text = text.replace(chat.IMAGE_PAD, chat.IMAGE_PAD * tokens, 1)
      ids = tokenizer(text, return_tensors="pt")["input_ids"]
      force = LogitsProcessorList([ForceAfter(ids.shape[1], FREE_TOKENS, actions[turn])])
      with torch.no_grad():
        out = torch_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                   mm_token_type_ids=(ids == config_lib.IMAGE_TOKEN_ID).long(),
                                   pixel_values=vision["pixel_values"], image_grid_thw=vision["image_grid_thw"],
                                   do_sample=True, top_k=0, top_p=1.0, logits_processor=force,
                                   max_new_tokens=FREE_TOKENS + len(actions[turn]))
      new = out[0, ids.shape[1]:]
      assert new[FREE_TOKENS:].tolist() == actions[turn], "the action was not forced"
      generated += len(new)
      result = tokenizer.decode(new, skip_special_tokens=True)
      text_so_far += "\n" + result
      if turn <= TOOL_TURNS:
        observation = tool.execute([type("Call", (), {"payload": f"query {turn}", "call_id": turn})()])[0]
        text_so_far += "\n" + observation.text
  return time.perf_counter() - start, generated / len(tasks)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tasks", type=int, default=64)
  parser.add_argument("--paper-tasks", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  torch.set_num_threads(1)
  load_start = os.getloadavg()
  hf_dir, torch_model = hf_tiny.make_tiny_hf_checkpoint(tempfile.mkdtemp(), tie=True)
  torch_model.generation_config.eos_token_id = None  # exactly the requested tokens per turn, like ours
  torch_model.generation_config.pad_token_id = 0
  config = config_lib.from_hf_config(hf_dir)
  params = hf.params_from_state_dict(torch_model.state_dict(), config)
  tokenizer = chat.load_tokenizer()
  actions = action_ids(tokenizer)
  tasks = make_tasks(args.tasks)
  engine = our_engine(config, tokenizer, actions)
  seeds = iter(range(1000))
  first_s, _, redrawn = our_run(engine, params, tasks, seeds)  # warm-up (compiles)
  paper_loop(hf_dir, torch_model, tasks[:1], actions)
  ours_times, paper_times, runs = [], [], []
  for _ in range(args.repeats):  # the sides alternate, so load changes hit both
    seconds, stats, again = our_run(engine, params, tasks, seeds)
    redrawn += again
    ours_times.append(seconds)
    runs.append(stats)
    seconds, paper_tokens = paper_loop(hf_dir, torch_model, tasks[:args.paper_tasks], actions)
    paper_times.append(seconds)
  our_tokens = runs[0]["sampled_tokens"] / args.tasks
  assert our_tokens == paper_tokens, f"ours decodes {our_tokens} tokens per task, the paper loop {paper_tokens}"
  ours_s, paper_s = statistics.median(ours_times), statistics.median(paper_times)
  ours_rate, paper_rate = args.tasks / ours_s, args.paper_tasks / paper_s
  median = lambda key: round(statistics.median(r.get(key, 0.0) for r in runs), 3)
  steps = runs[0]["decode_steps"]
  text = config.text
  print(
      json.dumps({
          "tasks": args.tasks,
          "tool_turns": TOOL_TURNS,
          "tokens_per_task_both_sides": our_tokens,
          "ours_tasks_s": round(ours_rate, 2),
          "ours_run_s": [round(t, 2) for t in ours_times],
          "ours_first_run_s": round(first_s, 2),
          "ours_runs_redrawn": redrawn,
          "paper_loop_tasks_s": round(paper_rate, 3),
          "paper_run_s": [round(t, 2) for t in paper_times],
          "paper_tasks_measured": args.paper_tasks,
          "speedup": round(ours_rate / paper_rate, 1),
          "speedups": [round((args.tasks / o) / (args.paper_tasks / p), 1) for o, p in zip(ours_times, paper_times)],
          "ours_breakdown_s": {
              k: median(k) for k in ("prefill_s", "generate_s", "extend_s", "tools_wait_s")
          },
          "ours_decode_steps": steps,
          "ours_step_ms": round(1e3 * median("generate_s") / steps, 2),
          "paper_token_ms": round(1e3 * paper_s / (args.paper_tasks * paper_tokens), 2),
          "vocab_parts_ms": {
              f"batch {b}": {
                  k: round(1e3 * v, 2) for k, v in decode_floor_s(text.hidden_size, text.vocab_size, b).items()
              } for b in (1, args.tasks)
          },
          "vocab_matmul_gflop": round(2 * args.tasks * text.hidden_size * text.vocab_size / 1e9, 3),
          "load_average": [round(x, 1) for x in load_start + os.getloadavg()],
      }))


if __name__ == "__main__":
  main()
