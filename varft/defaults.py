"""Every config key the trainer reads, with defaults; experiment files (`experiments/*.py`) start from this."""
from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """The defaults; a key missing here cannot be overridden from the command line."""
  c = ml_collections.ConfigDict()
  c.mode = "train"  # train | eval
  c.task = "agent"  # agent (data + multi-turn rollouts with tools + rewards) | echo (the loop's sanity task)
  c.seed = 0
  c.total_steps = 100  # rollout steps; each runs grpo.epochs optimizer updates
  c.log_every = 1
  c.checkpoint_every = 50
  c.keep_checkpoints = 3
  c.async_checkpoints = True
  c.samples_every = 10  # write readable sample rollouts (HTML + PNGs) every N steps; 0 = never
  c.eval_every = 0  # evaluate every N steps and at the end; 0 = never
  c.export_hf = True
  c.distributed = "auto"  # jax.distributed.initialize(): auto | True | False

  c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})

  c.model = ml_collections.ConfigDict()
  c.model.name = "tiny"  # a preset of varft.models.qwen25vl.config (tiny | 3b | 7b) ...
  c.model.hf_dir = ""  # ... or an HF Qwen2.5-VL checkpoint folder to load
  c.model.init_seed = 0
  c.model.dtype = "bfloat16"  # compute dtype
  c.model.param_dtype = "float32"  # master weights
  c.model.remat = True

  c.grpo = ml_collections.ConfigDict()
  c.grpo.beta = 0.04
  c.grpo.eps_low = 0.2
  c.grpo.eps_high = 0.2
  c.grpo.advantage = "std"  # std | no_std (Dr. GRPO) | leave_one_out
  c.grpo.aggregation = "sequence_mean"  # sequence_mean (the paper) | token_mean
  c.grpo.epochs = 1  # mu: updates per rollout batch
  c.grpo.tis_cap = 0.0  # > 0: truncated sampler/trainer importance correction
  c.grpo.micro_batches = 1
  c.grpo.logits_chunk = 256
  c.grpo.train_vision = True

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 1e-6
  c.optim.schedule = "cosine"  # cosine | linear | constant, after warmup_steps of linear warm-up
  c.optim.warmup_steps = 0
  c.optim.end_ratio = 0.0
  c.optim.weight_decay = 0.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.max_grad_norm = 1.0

  c.rollout = ml_collections.ConfigDict()
  c.rollout.prompts_per_host = 8
  c.rollout.num_samples = 8  # G
  c.rollout.temperature = 1.0

  c.eval = ml_collections.ConfigDict()
  c.eval.num_prompts = 64
  return c
