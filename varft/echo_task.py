"""The echo task: a seconds-fast sanity check of the whole RL loop (signs, masks, advantages, resume, sharding).

The prompt shows one token; the policy answers with one token and earns reward 1 when it repeats the shown token.
A random policy over a vocabulary of V tokens scores about 1/V; a correct GRPO loop drives the mean reward to ~1.
Rollouts go through the real sampler (`varft.sampling`: prefill into the KV cache, one sampled token), so the
sampler's log-probs are the old log-probs of the update exactly as in the agentic task, and the batches follow the
schema of `varft.batch` (text only: no image table). Rows are spread over every device of the host; with several
hosts each samples its own prompts on its own devices.
"""
from __future__ import annotations

import time
from typing import Any

import jax
import ml_collections
import numpy as np

from varft import batch as batch_lib
from varft import rollout_sharding, sampling
from varft.environment import Experience
from varft.models.qwen25vl.config import Qwen25VLConfig, TextConfig, VisionConfig

SHOW_TOKEN, ANSWER_TOKEN = 0, 1  # the prompt is [SHOW, x, ANSWER]; the sampled answer follows
FIRST_SHOWN = 2  # shown tokens are drawn from FIRST_SHOWN .. vocab_size - 1


def model_config(vocab_size: int = 16, hidden_size: int = 32, num_layers: int = 2) -> Qwen25VLConfig:
  """A tiny text-only policy for the echo task (4 heads of 8 dims, M-RoPE sections (1, 1, 2))."""
  text = TextConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                    num_layers=num_layers, num_heads=4, num_kv_heads=2, mrope_section=(1, 1, hidden_size // 8 - 2),
                    max_position_embeddings=64)
  vision = VisionConfig(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=hidden_size,
                        fullatt_block_indexes=(0,))
  return Qwen25VLConfig(text=text, vision=vision)


def config_model(config: ml_collections.ConfigDict) -> Qwen25VLConfig:
  """The echo policy of `config.model.echo` (the task registry's model config)."""
  return model_config(**dict(config.model.get("echo", {})))


class EchoPrompts:
  """The training prompts: a counter of prompts shown so far, `prompts_per_host` more each step (resumable)."""

  def __init__(self, prompts_per_host: int):
    self.prompts_per_host = prompts_per_host
    self.next_prompt = 0

  def __iter__(self):
    return self

  def __next__(self) -> int:
    """The index of the step's first prompt."""
    first = self.next_prompt
    self.next_prompt += self.prompts_per_host
    return first

  def get_state(self) -> dict[str, Any]:
    return {"next_prompt": self.next_prompt}

  def set_state(self, state: dict[str, Any]) -> None:
    self.next_prompt = int(state.get("next_prompt", 0))


class EchoEnvironment:
  """Prompts `prompts_per_host` shown tokens per step, G samples each (`varft.environment.Task`)."""

  def __init__(self, model_cfg: Qwen25VLConfig, mesh, prompts_per_host: int, num_samples: int, temperature: float = 1.0,
               seed: int = 0, eval_prompts: int = 64, tensor_parallel: int = 1):
    self.model_cfg = model_cfg
    self.mesh = mesh
    self.rollout_mesh = rollout_sharding.rollout_mesh(mesh, tensor_parallel)
    self.prompts_per_host = prompts_per_host
    self.num_samples = num_samples
    self.temperature = temperature
    self.seed = seed
    self.eval_prompts = eval_prompts
    # One stop pattern that no token can fill (no token carries its bit): answers end by length only.
    no_stops = sampling.StopTable(np.zeros((model_cfg.text.vocab_size,), np.int32), np.ones((1, 1), np.int32),
                                  ("<never>",))
    self._samplers = {
        greedy: sampling.Sampler(model_cfg,
                                 sampling.SamplingConfig(0.0 if greedy else temperature, max_new_tokens=1, eos_ids=()),
                                 no_stops, mesh=self.rollout_mesh) for greedy in (False, True)
    }

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, model_cfg: Qwen25VLConfig, mesh,
                  workdir: str) -> EchoEnvironment:
    del workdir  # the echo task writes nothing
    r = config.rollout
    return cls(model_cfg, mesh, r.prompts_per_host, r.num_samples, temperature=r.temperature, seed=config.seed,
               eval_prompts=config.eval.num_prompts)

  def train_data(self) -> EchoPrompts:
    return EchoPrompts(self.prompts_per_host)

  def _shown_tokens(self, start: int, count: int, salt: int) -> np.ndarray:
    host_rng = np.random.default_rng([self.seed, salt, jax.process_index(), start])
    return host_rng.integers(FIRST_SHOWN, self.model_cfg.text.vocab_size, count).astype(np.int32)

  def _rollout(self, params, shown: np.ndarray, rng, greedy: bool,
               num_samples: int = 1) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The batch of one answer per shown token (rows b * num_samples .. are one prompt's group) and the rewards."""
    params, rng = rollout_sharding.rollout_inputs(params, rng, self.mesh, self.rollout_mesh)
    n = len(shown)
    sampler = self._samplers[greedy]
    rows = -(-n // sampler.num_shards) * sampler.num_shards  # empty rows fill the last devices
    prompt = np.stack([np.full(n, SHOW_TOKEN), shown, np.full(n, ANSWER_TOKEN)], axis=1).astype(np.int32)
    cache = sampler.new_cache(rows, 4)
    chunk = sampling.text_chunk(list(prompt) + [[]] * (rows - n), [0] * rows, 3)
    hidden, cache = sampler.extend(params, cache, chunk)
    out, _ = sampler.generate(params, cache, hidden, [3] * rows, rng, [1] * n + [0] * (rows - n))
    answer, logp = np.asarray(out.tokens[:n, 0]), np.asarray(out.logps[:n, 0])
    tokens = np.concatenate([prompt, answer[:, None]], axis=1)
    positions = np.broadcast_to(np.arange(4, dtype=np.int32), (3, 4))
    trajectories = [
        batch_lib.Row(b // num_samples, t, positions, [0, 0, 0, 1], [0, 0, 0, p], [None] * 4, [-1] * 4)
        for b, (t, p) in enumerate(zip(tokens, logp))
    ]
    batch = batch_lib.assemble(trajectories, {}, num_rows=n, num_samples=num_samples, num_devices=1, length=4)
    return batch, (answer == shown).astype(np.float32)

  def collect(self, params, rng, batches: EchoPrompts) -> Experience:
    start = time.perf_counter()
    shown = np.repeat(self._shown_tokens(next(batches), self.prompts_per_host, 0), self.num_samples)
    batch, rewards = self._rollout(params, shown, rng, greedy=False, num_samples=self.num_samples)
    rollout_s = time.perf_counter() - start
    samples = [{
        "text": f"shown {int(s)} -> answered {int(a)}",
        "reward": float(r)
    } for s, a, r in zip(shown[:4], batch["tokens"][:4, 3], rewards[:4])]
    return Experience(batch=batch, rewards=rewards, components={"echo": rewards}, stats={
        "time/rollout_s": rollout_s,
        "rollout/completion_tokens": 1.0
    }, samples=samples)

  def evaluate(self, params, rng, out_dir: str | None = None) -> dict[str, float]:
    """Greedy accuracy on a fixed set of prompts."""
    shown = self._shown_tokens(0, self.eval_prompts, 1)
    _, correct = self._rollout(params, shown, rng, greedy=True)
    return {"eval/accuracy": float(correct.mean())}

  def close(self) -> None:
    """Nothing to release: the echo task starts no tools."""
