"""The echo task: the policy must repeat the token shown in its prompt. A seconds-fast check of the RL loop.

    python -m varft.main --config=experiments/echo.py --workdir=/tmp/echo
"""
from varft import defaults


def get_config(arg=None):
  del arg
  c = defaults.base_config()
  c.task = "echo"
  c.total_steps = 60
  c.checkpoint_every = 10
  c.samples_every = 20
  c.eval_every = 20
  c.export_hf = False
  c.model.echo = {"vocab_size": 16, "hidden_size": 32, "num_layers": 2}
  c.model.dtype = "float32"
  c.model.remat = False
  c.grpo.beta = 0.0
  c.optim.learning_rate = 3e-3
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 0
  c.rollout.prompts_per_host = 16
  c.rollout.num_samples = 8
  c.eval.num_prompts = 64
  return c
