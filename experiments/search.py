"""Visual-ARFT search agent (MAT-Search): Qwen2.5-VL + a search tool, trained with GRPO.

    python -m varft.main --config=experiments/search.py:demo --workdir=/tmp/search_demo
    python -m varft.main --config=experiments/search.py:7b,multiturn --workdir=... \\
        --config.model.hf_dir=/ckpt/Qwen2.5-VL-7B-Instruct --config.data.mat_dir=/data/MAT \\
        --config.tools.search.corpus=/data/wiki.jsonl
    ... --config.mode=eval   (MAT-Search + multi-hop QA, predictions in the paper's JSON format)

arg: `demo` | `3b` | `7b`, optionally with `,stepwise` (default: the paper's step-wise training on
rft_agent_search_20.json) or `,multiturn` (full rollouts with real searches, outcome reward), and `,paper` (as the
released code does where varft differs: math_verify in the accuracy reward, REINFORCE ratio, samples to EOS scored
by the fullmatch format rules; see the README).

The paper's recipe (Visual-ARFT scripts, 8 GPUs): G=8 samples per prompt, 1 prompt per GPU and 2 accumulation
steps (16 prompts per update), beta 0.04, lr 1e-6 (AdamW, HF defaults: linear decay, no warm-up, clip 1.0),
bf16 with gradient checkpointing, max_pixels 401408 (inputs resized to 720x720), 400 epochs over the 63 step
samples of 20 trajectories (~1600 updates), one PPO epoch (mu = 1).
"""
from varft import defaults


def get_config(arg="demo"):
  c, size, mode = defaults.agent_config(arg, "experiments/search.py")
  c.data.train = "mat_training/search"
  c.reward_options.task = "search"
  c.tools.use_code = False
  c.tools.search.name = "bm25"
  if mode == "stepwise":
    c.rewards = [("accuracy", 1.0), ("format", 1.0)]
    c.reward_options.math_verify = c.paper  # the released search trainer tries math_verify first
  else:
    c.rewards = [("answer_f1", 1.0), ("format", 0.5), ("failed_calls", 0.1)]
  c.eval.benchmarks = ("mat_search", "2wiki", "hotpotqa", "musique", "bamboogle")

  if size == "demo":
    defaults.apply_demo(c)
    c.eval.benchmarks = ("mat_search", "multihop_demo")
    return c
  defaults.apply_paper_recipe(c, size, mode)
  c.total_steps = 1600
  c.keep_checkpoint_steps = (200,)  # the step the paper reports
  c.eval_every = 400
  return c
