"""Multi-turn agentic throughput: varft's batched rollout engine vs the paper's evaluation loop, same tiny model.

Workload: 64 search tasks, each with one 224x224 image. Every trajectory makes 3 tool turns and then answers: each
turn samples 24 free tokens followed by its action (`<search> q </search>`, the last turn `<answer> a </answer>`),
and each search is answered by a deterministic local tool (a fixed passage in the paper's `<information>` format).

* ours: `RolloutEngine.run` over all 64 tasks at once (one batch, the KV cache extended turn by turn, the image
  encoded once; continuous batching); the action tokens are forced through the sampler (a scripted policy,
  `tests.rollout.scripted`), the free tokens sampled.
* paper: the structure of Visual-ARFT's evaluation scripts: one task at a time; every turn re-renders the whole
  conversation with the chat template, re-tokenizes it, re-processes the image and calls transformers `generate`
  (24 new tokens, sampled) on the full prompt; the action text is appended to the conversation as the model's.

The paper loop is sequential, so its per-task time is measured on `--paper-tasks` tasks and reported as tasks/s;
ours is the median of `--repeats` full runs after a warm-up run.

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
import numpy as np
from PIL import Image
import torch
from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

from tests import hf_tiny
from tests.rollout import scripted
from varft import prompts, rollout
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


def ours(config, params, tokenizer, tasks, repeats):
  forced = {t: [-1] * FREE_TOKENS + tokenizer.encode(action_text(t)) for t in range(1, TOOL_TURNS + 2)}
  engine = scripted.ScriptedEngine(
      config, tokenizer, LocalSearch(),
      rollout.RolloutConfig(max_turns=TOOL_TURNS + 1, max_new_tokens=40, max_total_tokens=768,
                            length_buckets=(512, 768), chunk_buckets=(64,), patch_buckets=(256,),
                            image_max_pixels=224 * 224, temperature=1.0), script=lambda row, turn: forced[turn])
  times, stats = [], None
  for i in range(repeats + 1):
    start = time.perf_counter()
    result = engine.run(params, tasks, jax.random.PRNGKey(i), num_samples=1)
    times.append(time.perf_counter() - start)
    stats = result.stats
  assert stats["stop_reasons"]["answer"] == len(tasks), stats["stop_reasons"]
  assert stats["tool_calls"] == TOOL_TURNS * len(tasks)
  return statistics.median(times[1:]), times[0], stats


def paper_loop(hf_dir, torch_model, tasks):
  """One task at a time; every turn re-encodes the whole conversation and calls generate (the paper's scripts)."""
  tokenizer = AutoTokenizer.from_pretrained(hf_dir)
  image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=224 * 224)
  tool = LocalSearch()
  start = time.perf_counter()
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
      with torch.no_grad():
        out = torch_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                   mm_token_type_ids=(ids == config_lib.IMAGE_TOKEN_ID).long(),
                                   pixel_values=vision["pixel_values"], image_grid_thw=vision["image_grid_thw"],
                                   do_sample=True, max_new_tokens=FREE_TOKENS)
      result = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True) + action_text(turn)
      text_so_far += "\n" + result
      if turn <= TOOL_TURNS:
        observation = tool.execute([type("Call", (), {"payload": f"query {turn}", "call_id": turn})()])[0]
        text_so_far += "\n" + observation.text
  return time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tasks", type=int, default=64)
  parser.add_argument("--paper-tasks", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  torch.set_num_threads(1)
  hf_dir, torch_model = hf_tiny.make_tiny_hf_checkpoint(tempfile.mkdtemp(), tie=True)
  torch_model.generation_config.eos_token_id = None  # exactly FREE_TOKENS per turn, like ours
  torch_model.generation_config.pad_token_id = 0
  config = config_lib.from_hf_config(hf_dir)
  params = hf.params_from_state_dict(torch_model.state_dict(), config)
  tasks = make_tasks(args.tasks)
  ours_s, first_s, stats = ours(config, params, chat.load_tokenizer(), tasks, args.repeats)
  paper_loop(hf_dir, torch_model, tasks[:1])  # warm-up
  paper_s = paper_loop(hf_dir, torch_model, tasks[:args.paper_tasks])
  ours_rate, paper_rate = args.tasks / ours_s, args.paper_tasks / paper_s
  print(
      json.dumps({
          "tasks": args.tasks,
          "tool_turns": TOOL_TURNS,
          "ours_tasks_s": round(ours_rate, 2),
          "ours_run_s": round(ours_s, 2),
          "ours_first_run_s": round(first_s, 2),
          "paper_loop_tasks_s": round(paper_rate, 3),
          "paper_tasks_measured": args.paper_tasks,
          "speedup": round(ours_rate / paper_rate, 1),
          "ours_breakdown_s": {
              k: stats.get(k) for k in ("prefill_s", "generate_s", "extend_s", "tools_wait_s")
          },
      }))


if __name__ == "__main__":
  main()
