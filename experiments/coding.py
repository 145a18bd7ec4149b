"""Visual-ARFT coding agent (MAT-Coding): Qwen2.5-VL writes Python that repairs the input image, trained with GRPO.

    python -m varft.main --config=experiments/coding.py:demo --workdir=/tmp/coding_demo
    python -m varft.main --config=experiments/coding.py:7b,multiturn --workdir=... \\
        --config.model.hf_dir=/ckpt/Qwen2.5-VL-7B-Instruct --config.data.mat_dir=/data/MAT
    ... --config.mode=eval   (MAT-Coding, predictions in the paper's JSON format)

arg: `demo` | `3b` | `7b`, optionally with `,stepwise` (default: the paper's step-wise training on
rft_agent_code_1_2k.json: problem / code / answer steps) or `,multiturn` (full rollouts, code really runs in the
sandbox, the repaired image goes back to the model, outcome reward).

The paper's recipe (Visual-ARFT scripts, 8 GPUs): G=8, 1 prompt per GPU x 2 accumulation steps (16 prompts per
update), beta 0.04, lr 1e-6 (AdamW, HF defaults), bf16 + gradient checkpointing, max_pixels 401408 (inputs
resized to 720x720), 10 epochs over the ~3.4k step samples of 1.2k items (~2100 updates), mu = 1.
"""
from varft import defaults


def get_config(arg="demo"):
  size, _, mode = arg.partition(",")
  mode = mode or "stepwise"
  if size not in ("demo", "3b", "7b") or mode not in ("stepwise", "multiturn"):
    raise ValueError(f"experiments/coding.py: arg {arg!r} must be demo|3b|7b[,stepwise|multiturn]")
  c = defaults.base_config()
  c.task = "agent"
  c.rollout.mode = mode
  c.data.train = "mat_training/coding"
  c.reward_options.task = "coding"
  c.tools.use_code = True
  c.tools.search.name = ""
  if mode == "stepwise":
    c.rewards = [("accuracy", 1.0), ("format", 1.0)]
  else:
    c.rewards = [("answer_f1", 1.0), ("format", 0.5), ("code_success", 0.2), ("failed_calls", 0.1)]
  c.eval.benchmarks = ("mat_coding",)

  if size == "demo":
    return _demo(c)
  c.model.name = size
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.remat = True
  c.total_steps = 2100
  c.checkpoint_every = 100
  c.samples_every = 20
  c.eval_every = 500
  c.grpo.beta = 0.04
  c.grpo.epochs = 1
  c.grpo.micro_batches = 16
  c.optim.learning_rate = 1e-6
  c.optim.schedule = "linear"
  c.optim.warmup_steps = 0
  c.rollout.prompts_per_host = 16
  c.rollout.num_samples = 8
  c.rollout.temperature = 1.0
  c.rollout.max_new_tokens = 256 if mode == "stepwise" else 512
  c.rollout.max_total_tokens = 4096
  c.rollout.image_max_pixels = 401408
  c.data.resize = 720
  c.mesh = {"data": 1, "fsdp": -1, "tensor": 1}
  return c


def _demo(c):
  """The tiny model on the embedded demo: finishes on 2 CPU cores in a few minutes."""
  c.data.demo = True
  c.model.name = "tiny"
  c.model.dtype = "float32"
  c.model.remat = False
  c.total_steps = 6
  c.checkpoint_every = 3
  c.samples_every = 3
  c.eval_every = 6
  c.export_hf = True
  c.optim.learning_rate = 1e-4
  c.optim.schedule = "constant"
  c.rollout.prompts_per_host = 2
  c.rollout.num_samples = 4
  c.rollout.max_turns = 2
  c.rollout.max_new_tokens = 24
  c.rollout.max_total_tokens = 1024
  c.rollout.max_tool_output_tokens = 96
  c.rollout.length_buckets = (1024,)
  c.rollout.chunk_buckets = (128,)
  c.rollout.patch_buckets = (1024,)
  c.rollout.image_max_pixels = 224 * 224
  c.tools.code.prewarm = False
  c.tools.code.max_concurrency = 2
  c.samples_per_step = 4
  c.eval.num_prompts = 8
  c.eval.batch_size = 4
  c.eval.max_turns = 2
  return c
