"""Visual-ARFT coding agent (MAT-Coding): Qwen2.5-VL writes Python that repairs the input image, trained with GRPO.

    python -m varft.main --config=experiments/coding.py:demo --workdir=/tmp/coding_demo
    python -m varft.main --config=experiments/coding.py:7b,multiturn --workdir=... \\
        --config.model.hf_dir=/ckpt/Qwen2.5-VL-7B-Instruct --config.data.mat_dir=/data/MAT
    ... --config.mode=eval   (MAT-Coding, predictions in the paper's JSON format)

arg: `demo` | `3b` | `7b`, optionally with `,stepwise` (default: the paper's step-wise training on
rft_agent_code_1_2k.json: problem / code / answer steps) or `,multiturn` (full rollouts, code really runs in the
sandbox, the repaired image goes back to the model, outcome reward), and `,paper` (as the released code does where
varft differs: one sample per group scored as the reference step, REINFORCE ratio, samples to EOS scored by the
fullmatch format rules; see the README).

The paper's recipe (Visual-ARFT scripts, 8 GPUs): G=8, 1 prompt per GPU x 2 accumulation steps (16 prompts per
update), beta 0.04, lr 1e-6 (AdamW, HF defaults), bf16 + gradient checkpointing, max_pixels 401408 (inputs
resized to 720x720), 10 epochs over the ~3.4k step samples of 1.2k items (~2100 updates), mu = 1.
"""
from varft import defaults


def get_config(arg="demo"):
  c, size, mode = defaults.agent_config(arg, "experiments/coding.py")
  c.data.train = "mat_training/coding"
  c.reward_options.task = "coding"
  c.tools.use_code = True
  c.tools.search.name = ""
  if mode == "stepwise":
    c.rewards = [("accuracy", 1.0), ("format", 1.0)]
    c.reward_options.gold_injection = c.paper  # the released coding trainer scores one sample per group as the gt
  else:
    c.rewards = [("answer_f1", 1.0), ("format", 0.5), ("code_success", 0.2), ("failed_calls", 0.1)]
  c.eval.benchmarks = ("mat_coding",)

  if size == "demo":
    defaults.apply_demo(c)
    c.tools.code.max_concurrency = 2
    c.rollout.max_new_tokens = 128  # a reference code step is up to ~110 tokens
    c.rollout.max_total_tokens = 768  # the longest prompt (an answer step's) is ~580 tokens
    c.rollout.length_buckets = (768,)
    c.grpo.logits_chunk = 32  # 16 rows x 128 slots: logits 32 positions at a time keep the update near 2.6 GB
    c.sft.length_buckets = (640, 768)  # step rows are <= ~590 tokens, whole trajectories (multiturn) <= ~660
    c.rollout.temperature = 0.3  # turns up to 5x the search demo's: fewer sampling slips per turn
    c.rollout.max_turns = c.eval.max_turns = 3  # problem, code (runs in the sandbox), answer
    return c
  defaults.apply_paper_recipe(c, size, mode)
  c.total_steps = 2100
  c.keep_checkpoint_steps = (1400,)  # the step the paper reports
  c.eval_every = 500
  return c
