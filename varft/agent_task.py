"""The agentic task: data pipeline -> multi-turn (or step-wise) rollouts with real tools -> rewards.

Wires the pieces the training loop and the evaluation need: the TFDS/grain input (`varft.data`), the rollout engine
(`varft.rollout`, sampler + tool executor), the reward ops (`varft.rewards`) and the benchmark scoring
(`varft.eval.score`). Everything here is host-side Python around the jitted sampler.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import json
import os
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from varft import batch_placement, rollout_sharding
from varft import rewards as rewards_lib
from varft import rollout as rollout_lib
from varft.environment import Experience, SampleRejected
from varft.eval import stream
from varft.processing import image as image_lib
from varft.rewards import host as reward_host


def model_config(config: ml_collections.ConfigDict):
  """The policy: the checkpoint's config.json (`model.hf_dir`) or the preset `model.name` (the task registry's
  model config)."""
  from varft.models.qwen25vl import config as model_config_lib
  return model_config_lib.get_config(config.model.hf_dir or config.model.name)


def data_paths(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
  """Where the data lives: the configured folders, or the embedded demo generated once under the workdir."""
  d = config.data
  if d.demo:
    from varft.data import demo
    root = os.path.join(workdir, "demo_data")
    marker = os.path.join(root, "layout.json")
    if jax.process_index() == 0 and not os.path.exists(marker):
      info = demo.generate(root, seed=0)
      with open(marker, "w") as f:
        json.dump({k: v for k, v in info.items() if k != "counts"}, f)
    paths = demo.layout(root)
  else:
    paths = {"mat_dir": d.mat_dir, "flashrag_dir": d.flashrag_dir, "corpus": config.tools.search.get("corpus", "")}
  return paths


def load_source(dataset: str, split: str | None, manual_dir: str, tfds_dir: str):
  """A random-access source of `dataset`'s records (prepared once into `tfds_dir` from its download folder)."""
  from varft.data import builders
  if not manual_dir and not tfds_dir:
    raise ValueError(f"Dataset {dataset} needs its download folder: set config.data.mat_dir / "
                     "config.data.flashrag_dir (or config.data.demo=True for the embedded demo)")
  return builders.load(dataset, split or None, manual_dir=manual_dir or None, data_dir=tfds_dir or None)


def training_source(config: ml_collections.ConfigDict, paths: Mapping[str, str], dataset: str):
  """`dataset`'s `config.data.train_split` records: the RL prompts and the SFT references read the same."""
  manual_dir = paths["flashrag_dir" if dataset.startswith("multihop_qa/") else "mat_dir"]
  return load_source(dataset, config.data.train_split or None, manual_dir, config.data.tfds_dir)


def tool_executor_config(config: ml_collections.ConfigDict, paths: Mapping[str, str], workdir: str) -> dict:
  t = config.tools
  out = {k: t[k] for k in ("max_workers", "topk", "search_format", "search_timeout_s", "max_doc_chars")}
  if t.search.name:
    search = dict(t.search)
    if search["name"] in ("bm25", "dense"):
      search["corpus"] = search.get("corpus") or paths.get("corpus", "")
      search["index_dir"] = search.get("index_dir") or os.path.join(workdir, f"search_index_{search['name']}")
    out["search"] = {k: v for k, v in search.items() if v not in ("", None)}
  if t.use_code:  # tool images come back no larger than the model will see them (in training or evaluation)
    from varft.eval import settings
    seen = max(config.rollout.image_max_pixels, settings.image_pixels(config)[1])
    out["code"] = {"observe_max_pixels": seen, **dict(t.code)}
  return out


TRAINER_ROLLOUT_KEYS = ("prompts_per_host", "num_samples", "tensor_parallel")


def sampling_tensor_parallel(config: ml_collections.ConfigDict, model_cfg, dtype) -> int:
  """`config.rollout.tensor_parallel` resolved (`rollout_sharding.resolve_tensor_parallel`) for the sampling weights."""
  from varft.models.qwen25vl import model
  shapes = jax.eval_shape(lambda: model.init_params(jax.random.key(0), model_cfg, dtype))
  return rollout_sharding.resolve_tensor_parallel(config.rollout.get("tensor_parallel", "auto"),
                                                  sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes)))


def rollout_config(rollout: ml_collections.ConfigDict, **overrides) -> rollout_lib.RolloutConfig:
  """The engine's RolloutConfig from `config.rollout` (every key but the trainer's batch keys)."""
  names = {f.name for f in dataclasses.fields(rollout_lib.RolloutConfig)}
  unknown = sorted(set(rollout.keys()) - names - set(TRAINER_ROLLOUT_KEYS))
  if unknown:
    raise ValueError(f"config.rollout has keys {unknown} that varft.rollout.RolloutConfig does not know; "
                     f"its fields: {sorted(names)}")
  values = {k: rollout[k] for k in rollout.keys() if k in names}
  values.update(overrides)
  return rollout_lib.RolloutConfig.from_config(values)


def references(examples: Sequence[Mapping[str, Any]], mode: str) -> tuple[list[dict], list[str] | None]:
  """What each trajectory is scored against: the reference step (step-wise) or the gold answers (multi-turn)."""
  if mode == "stepwise":
    return [{"solution": ex["solution"], "step_type": ex.get("step_type") or None} for ex in examples], None
  return [{"answers": list(ex.get("answers") or [])} for ex in examples], ["answer"] * len(examples)


def reference_error(ref: Mapping[str, Any], index: int, task: str, step_type: str | None) -> SampleRejected | None:
  """Why the reward ops cannot read reference `index` (`rewards.host.parse_reference`, a check of the data alone),
  or None when they can."""
  try:
    reward_host.parse_reference(ref, task=task, index=index, step_type=step_type)
  except ValueError as e:
    return SampleRejected(str(e))
  return None


def score_rows(completions: Sequence[str], refs: Sequence[Mapping[str, Any]], config, step_types=None,
               tool_stats=None) -> tuple[np.ndarray, dict[str, np.ndarray], int]:
  """`rewards.score_batch` on the rows whose reference can be read; a row whose reference cannot (`reference_error`)
  gets reward 0 and is counted and logged (a long run never dies on one bad sample). Any error of the scoring itself
  propagates. Returns (total, components, rows rejected)."""
  task = rewards_lib.options_from_config(config).task
  n = len(completions)
  good = []
  for i in range(n):
    error = reference_error(refs[i], i, task, None if step_types is None else step_types[i])
    if error is None:
      good.append(i)
    else:
      logging.warning("Reward of row %d skipped: %s", i, error)
  total = np.zeros((n,), np.float32)
  components = {name: np.zeros((n,), np.float32) for name, _ in rewards_lib.reward_weights(config.rewards)}
  if good:
    pick = lambda values: [values[i] for i in good]
    good_total, good_components = rewards_lib.score_batch(
        pick(completions), pick(refs), config, step_types=None if step_types is None else pick(step_types),
        tool_stats=None if tool_stats is None else {
            k: pick(v) for k, v in tool_stats.items()
        })
    total[good] = good_total
    for name, values in good_components.items():
      components[name][good] = values
  return total, components, n - len(good)


def scored_completions(result: rollout_lib.RolloutResult, examples: Sequence[Mapping[str, Any]],
                       options: rewards_lib.RewardOptions, tokenizer,
                       rng: np.random.Generator) -> tuple[list[str], np.ndarray, int]:
  """The text each trajectory is scored on: its completion (with `options.skip_special_tokens`, its sampled tokens
  decoded without special tokens), then with `options.gold_injection` one row per group replaced by its example's
  `gt` (`rewards.inject_gold`). Returns (texts, injected (N,) bool, groups without a gt)."""
  transcripts = result.transcripts
  if options.skip_special_tokens:  # batch row i is transcript i (the skipped prompts' empty rows come after)
    tokens, sampled = np.asarray(result.batch["tokens"]), np.asarray(result.batch["loss_mask"]) > 0
    texts = [tokenizer.decode(tokens[i][sampled[i]], skip_special_tokens=True) for i in range(len(transcripts))]
  else:
    texts = [t.completion for t in transcripts]
  if not options.gold_injection:
    return texts, np.zeros((len(texts),), bool), 0
  return rewards_lib.inject_gold(texts, [ex.get("gt") or "" for ex in examples], [t.group_id for t in transcripts], rng)


MAX_SKIPPED_BATCHES = 10


def rollout_next(engine, batches, params, rng, num_samples: int) -> tuple[list[dict], Any, int]:
  """The rollouts of the next batch of `batches` that has an example the engine can prompt: a batch it rejects
  whole (`SampleRejected`) is skipped, counted and logged. Returns (examples, result, batches skipped)."""
  for skipped in range(MAX_SKIPPED_BATCHES):
    examples = next(batches)
    try:
      return examples, engine.run(params, examples, rng, num_samples=num_samples), skipped
    except SampleRejected as e:
      logging.warning("Skipping a training batch: %s", e)
      last = e
  raise ValueError(f"{MAX_SKIPPED_BATCHES} training batches in a row could not be prompted (last: {last}); check "
                   "config.rollout.max_total_tokens and the data") from last


def tool_metrics(executor, kinds: Sequence[str]) -> dict[str, float]:
  """The executor's counters since the last call, then reset (`ToolExecutor.stats`): calls, errors, timeouts and
  latency per tool kind; the configured `kinds` count 0 on a step without calls (their curves have no gaps)."""
  zeros = {f"tools/{kind}/{name}": 0.0 for kind in kinds for name in ("calls", "errors", "timeouts")}
  return {**zeros, **{k: float(v) for k, v in executor.stats(reset=True).items()}}


def _flat_stats(stats: Mapping[str, Any], prefix: str = "rollout/") -> dict[str, float]:
  out = {}
  for key, value in stats.items():
    if isinstance(value, Mapping):
      total = max(sum(value.values()), 1)
      out.update({f"{prefix}stop_{k}": v / total for k, v in value.items()})
    elif key.endswith("_s"):
      out[f"time/{key}"] = float(value)
    elif isinstance(value, (int, float, np.number)):
      out[f"{prefix}{key}"] = float(value)
  return out


def transcript_sample(transcript: rollout_lib.Transcript, example: Mapping[str, Any], **fields) -> dict[str, Any]:
  """A transcript as a `metrics_writer.write_samples` entry: prompt images first, then the tools' images."""
  images = list(example.get("images") or ()) + list(transcript.images.values())
  return {
      "text": transcript.render(),
      "images": images,
      "id": transcript.example_id,
      "stop": transcript.stop_reason,
      **fields
  }


EVAL_PROMPTS = ("agent", "direct")


def check_config(config: ml_collections.ConfigDict) -> None:
  """The agent task's part of `run_config.validate`: a pretrained checkpoint for the 3b / 7b presets, the engine configs
  of training and evaluation (their dataclasses' own checks), the eval prompt, and the reward options that only
  step-wise training can use."""
  from varft.eval import settings
  size = config.model.name
  if size in ("3b", "7b") and not config.model.hf_dir:
    raise ValueError(f"config.model.hf_dir is empty: the {size} configs fine-tune a pretrained Qwen2.5-VL; "
                     f"pass --config.model.hf_dir=/path/to/Qwen2.5-VL-{size.upper()}-Instruct")
  rollout_config(config.rollout)
  rollout_config(config.rollout, **settings.rollout_overrides(config))
  if config.eval.get("prompt", "agent") not in EVAL_PROMPTS:
    raise ValueError(f"config.eval.prompt={config.eval.prompt!r} is not one of {EVAL_PROMPTS}")
  options = rewards_lib.options_from_config(config)
  for key in ("skip_special_tokens", "gold_injection"):  # both read one turn's text against one reference step
    if getattr(options, key) and config.rollout.mode != "stepwise":
      raise ValueError(f"config.reward_options.{key} is for step-wise training (rollout.mode=stepwise)")


class AgentEnvironment:
  """Training rollouts on `config.data.train` and evaluation on `config.eval.benchmarks` (`environment.Task`)."""

  def __init__(self, config: ml_collections.ConfigDict, model_cfg, mesh, workdir: str):
    from varft.processing import chat
    from varft.tools.executor import ToolExecutor
    self.config = config
    self.mode = config.rollout.mode
    self.prompts_per_host = config.rollout.prompts_per_host
    self.num_samples = config.rollout.num_samples
    self.paths = data_paths(config, workdir)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("varft_data_ready")
    tokenizer = chat.load_tokenizer(config.model.hf_dir or None)
    self.executor = ToolExecutor(tool_executor_config(config, self.paths, workdir))
    self.tool_kinds = ("search",) * bool(config.tools.search.name) + ("code",) * bool(config.tools.use_code)
    self.mesh = mesh
    self.compute_dtype = jnp.dtype(model_cfg.dtype)
    self.rollout_mesh = rollout_sharding.rollout_mesh(mesh,
                                                      sampling_tensor_parallel(config, model_cfg, self.compute_dtype))
    self.engine = rollout_lib.RolloutEngine(model_cfg, tokenizer, self.executor, rollout_config(config.rollout),
                                            mesh=self.rollout_mesh,
                                            batch_devices=batch_placement.devices_per_host(mesh))
    from varft.eval import settings
    self.eval_settings = settings.describe(config, self.executor.search_backend)  # recorded with each result
    eval_config = rollout_config(config.rollout, **settings.rollout_overrides(config))
    eval_prompt = config.eval.get("prompt", "agent")
    if eval_prompt == "direct":  # the paper's direct-answer baselines
      from varft.eval import direct
      self.eval_engine = direct.DirectAnswerEngine(model_cfg, tokenizer, eval_config, mesh=self.rollout_mesh,
                                                   max_new_tokens=config.eval.direct_max_new_tokens)
    else:
      self.eval_engine = rollout_lib.RolloutEngine(model_cfg, tokenizer, self.executor, eval_config,
                                                   mesh=self.rollout_mesh)
    self.reward_options = rewards_lib.options_from_config(config)

  def train_data(self):
    """The grain batches of `config.data.train` (`prompts_per_host` examples each; resumable)."""
    from varft.data import input_pipeline
    d = self.config.data
    source = training_source(self.config, self.paths, d.train)
    return input_pipeline.batches(source, batch_size=self.prompts_per_host, seed=self.config.seed,
                                  transform=image_lib.square_resizer(d.resize), balance_by=d.balance_by)

  def collect(self, params, rng, batches) -> Experience:
    """One step's rollouts on this host's next prompts, scored."""
    gold_rng = np.random.default_rng(np.asarray(jax.random.key_data(jax.random.fold_in(rng, jax.process_index()))))
    params, rng = rollout_sharding.rollout_inputs(params, rng, self.mesh, self.rollout_mesh, self.compute_dtype)
    start = time.perf_counter()
    examples, result, skipped_batches = rollout_next(self.engine, batches, params, rng, self.num_samples)
    rolled = time.perf_counter()
    by_row = [examples[_example_index(examples, t)] for t in result.transcripts]
    refs, step_types = references(by_row, self.mode)
    tool_stats = None
    if self.mode == "multiturn":
      stats = [t.tool_stats() for t in result.transcripts]
      tool_stats = {k: [s[k] for s in stats] for k in stats[0]}
    completions, injected, gold_missing = scored_completions(result, by_row, self.reward_options, self.engine.tokenizer,
                                                             gold_rng)
    total, components, reward_errors = score_rows(completions, refs, self.config, step_types, tool_stats)
    scored = time.perf_counter()
    rows = self.prompts_per_host * self.num_samples
    batch = result.batch  # `rows` rows: those of prompts the rollout skipped are empty
    rewards = np.zeros((rows,), np.float32)
    rewards[:len(total)] = total
    padded_components = {}
    for name, values in components.items():
      padded_components[name] = np.zeros((rows,), np.float32)
      padded_components[name][:len(values)] = values
    stats = _flat_stats(result.stats)
    stats.update({
        "time/rollout_s": rolled - start,
        "time/rewards_s": scored - rolled,
        "rollout/padded_rows": float(rows - len(total)),
        "rollout/skipped_batches": float(skipped_batches),
        "rollout/reward_errors": float(reward_errors)
    })
    stats.update(tool_metrics(self.executor, self.tool_kinds))
    if self.reward_options.gold_injection:
      stats.update({"rollout/gold_injected": float(injected.sum()), "rollout/gold_missing": float(gold_missing)})
    samples = [
        transcript_sample(t, ex, reward=float(r), **({
            "scored_as_gt": True
        } if g else {})) for t, ex, r, g in zip(result.transcripts, by_row, total, injected)
    ][:self.config.samples_per_step]
    return Experience(batch=batch, rewards=rewards, components=padded_components, stats=stats, samples=samples)

  def evaluate(self, params, rng, out_dir: str | None = None) -> dict[str, float]:
    """Greedy multi-turn evaluation on each configured benchmark: predictions JSON + score table under out_dir."""
    metrics = {}
    params, rng = rollout_sharding.rollout_inputs(params, rng, self.mesh, self.rollout_mesh, self.compute_dtype)
    for name in self.config.eval.benchmarks:
      metrics.update(evaluate_benchmark(self, name, params, rng, out_dir))
    metrics.update({f"eval/{k}": v for k, v in tool_metrics(self.executor, self.tool_kinds).items()})
    return metrics

  def close(self) -> None:
    """Stops the tool executor's workers and its sandbox."""
    self.executor.close()


def _example_index(examples: Sequence[Mapping[str, Any]], transcript: rollout_lib.Transcript) -> int:
  for i, ex in enumerate(examples):
    if str(ex.get("id", i)) == transcript.example_id:
      return i
  raise KeyError(f"No example with id {transcript.example_id!r} in the batch")


def evaluate_benchmark(env: AgentEnvironment, name: str, params, rng, out_dir: str | None) -> dict[str, float]:
  """Runs one benchmark (this host's share), gathers predictions on process 0, writes and scores them."""
  from varft.eval import score
  if name not in score.BENCHMARKS:
    raise ValueError(f"config.eval.benchmarks: unknown benchmark {name!r}; known: {sorted(score.BENCHMARKS)}")
  spec = score.BENCHMARKS[name]
  source = load_source(spec.dataset, spec.split, env.paths[spec.data_dir], env.config.data.tfds_dir)
  return stream.evaluate_source(env, name, source, params, rng, out_dir)
