"""Visual-ARFT coding agent (MAT-Coding): Qwen2.5-VL writes Python that repairs the input image, trained with GRPO.

    python -m varft.main --config=experiments/coding.py:demo --workdir=/tmp/coding_demo
    python -m varft.main --config=experiments/coding.py:7b,multiturn --workdir=... \\
        --config.model.hf_dir=/ckpt/Qwen2.5-VL-7B-Instruct --config.data.mat_dir=/data/MAT
    ... --config.mode=eval   (MAT-Coding, predictions in the paper's JSON format)

arg: `demo` | `3b` | `7b`, optionally with `,stepwise` (default: the paper's step-wise training on
rft_agent_code_1_2k.json: problem / code / answer steps) or `,multiturn` (full rollouts, code really runs in the
sandbox, the repaired image goes back to the model, outcome reward), and `,paper` (as the released code does where
varft differs: one sample per group scored as the reference step, REINFORCE ratio, samples to EOS scored by the
fullmatch format rules; see the README). Every value the recipe sets is below; the rest are the defaults of
`varft/defaults.py`.
"""
from varft import defaults


def get_config(arg="demo"):
  size, mode, paper = defaults.parse_agent_arg(arg, "experiments/coding.py")
  c = defaults.base_config()
  c.task = "agent"
  c.rollout.mode = mode
  c.paper = paper

  # --- The task: MAT-Training's coding trajectories, the code sandbox, MAT-Coding.
  c.data.train = "mat_training/coding"
  c.reward_options.task = "coding"
  c.tools.use_code = True
  c.tools.search.name = ""
  if mode == "stepwise":
    c.rewards = [("accuracy", 1.0), ("format", 1.0)]
    c.reward_options.gold_injection = paper  # the released coding trainer scores one sample per group as the gt
  else:
    c.rewards = [("answer_f1", 1.0), ("format", 0.5), ("code_success", 0.2), ("failed_calls", 0.1)]
  c.eval.benchmarks = ("mat_coding",)

  if size == "demo":
    # --- The demo recipe: the tiny model on the embedded demo, a supervised warm-up on the reference steps, then
    # GRPO; a few minutes on 2 CPU cores. The tiny model learns the format and the tool calls, not to read images.
    c.data.demo = True
    c.model.name = "tiny"
    c.model.dtype = "float32"
    c.model.remat = False
    # Dense XLA attention: at 16 rows x 768 tokens x 4 heads its scores are small, and on CPU it is ~2.5x faster
    # (forward + backward) than the chunked online softmax `auto` picks there (benchmarks/demo_update_profile.py).
    c.model.attention = "dot_product"
    # A random 10M model needs ~100 updates to write the template in order: many small, short batches. The coding
    # steps need 300: after 150 the step-type decisions (which step, which tag, which program line) are still near
    # 50/50 and the warm-up policy writes the format in ~40% of its rollouts (BENCHMARKS.md, issue 16 second pass).
    c.sft.steps = 300
    c.sft.batch_size = 2
    c.sft.learning_rate = 1.5e-2
    c.sft.warmup_steps = 10
    c.sft.schedule = "cosine"  # annealing to 0 brings the last loss down: the tags come out right more often
    c.sft.think = "step"  # the gt thinks describe the image, which the tiny model cannot read
    c.sft.length_buckets = (640, 768)  # step rows are <= ~590 tokens, whole trajectories (multiturn) <= ~660
    # GRPO steps after the warm-up. At 16 the rise was +1.4 and +0.4 x its noise on seeds 0 and 1 (format 0.938 and
    # 0.729 over the last 3); at 32, +2.0 and +1.6 (0.958 and 0.938), ~4.5 s a step (BENCHMARKS.md, "The search
    # demo's rows in a 768-token bucket").
    c.total_steps = 32
    c.checkpoint_every = 80
    c.samples_every = 10
    c.eval_every = 1000  # at the end only
    c.export_hf = True
    c.grpo.beta = 0.0  # a few RL steps from the warmed-up policy: no KL anchor, no reference forward pass
    c.grpo.logits_chunk = 32  # 16 rows x 128 slots: logits 32 positions at a time keep the update near 2.6 GB
    # Well below the warm-up's peak: fresh AdamW moments move every parameter by ~lr on GRPO's first update.
    c.optim.learning_rate = 3e-4
    c.optim.schedule = "constant"
    c.rollout.prompts_per_host = 4  # 16 rollouts per step: a step's mean reward is not just which prompts came up
    # Every batch mixes the step types alike (the demo has 12 problem, 11 code, 12 answer steps): with a plain shuffle
    # a step's mean reward swings with which types its 4 prompts are (a code step earns the paper's constant 0.9).
    c.data.balance_by = "step_type"
    c.rollout.num_samples = 4
    c.rollout.temperature = 0.3  # turns up to 5x the search demo's: fewer sampling slips per turn
    c.rollout.max_turns = 3  # problem, code (runs in the sandbox), answer
    c.rollout.max_new_tokens = 128  # a reference code step is up to ~110 tokens
    c.rollout.max_total_tokens = 768  # the longest prompt (an answer step's) is ~580 tokens
    c.rollout.max_tool_output_tokens = 96
    c.rollout.length_buckets = (768,)
    c.rollout.chunk_buckets = (128,)
    c.rollout.patch_buckets = (1024,)
    c.rollout.image_max_pixels = 112 * 112  # 16 image tokens: the tiny model cannot read images anyway
    c.tools.code.prewarm = False
    c.tools.code.max_concurrency = 2
    c.samples_per_step = 4
    c.eval.num_prompts = 4  # one batch: the tiny model's MAT-Coding scores are a smoke test, not a result
    c.eval.batch_size = 4
    c.eval.max_turns = 3
    return c

  # --- The paper's recipe (Visual-ARFT scripts, 8 GPUs): G=8 samples per prompt, 1 prompt per GPU x 2 accumulation
  # steps (16 prompts per update), beta 0.04, lr 1e-6 (AdamW with HF defaults: linear decay, no warm-up, clip 1.0),
  # bf16 with gradient checkpointing, max_pixels 401408 with inputs resized to 720x720, one PPO epoch (mu = 1);
  # 10 epochs over the ~3.4k step samples of 1.2k items (~2100 updates).
  c.model.name = size
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.remat = True
  c.total_steps = 2100
  c.checkpoint_every = 100
  c.keep_checkpoint_steps = (1400,)  # the step the paper reports
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
  c.rollout.top_k = 50 if paper else 0  # the released trainer samples with transformers' default top-k 50
  c.rollout.max_new_tokens = 256 if mode == "stepwise" else 512
  c.rollout.max_total_tokens = 4096
  c.rollout.image_max_pixels = 401408
  c.data.resize = 720
  c.reward_options.query_similarity = "minilm"
  c.mesh = {"data": 1, "fsdp": -1, "tensor": 1}
  if paper:
    # --- As the released trainers do where varft differs (the README's "Paper setting" lists every difference):
    # the policy term exp(logp - sg(logp)) A (REINFORCE with the group baseline, never clipped); samples run to EOS
    # (so <|im_end|> is sampled and trained) and are scored decoded without special tokens, by the fullmatch format
    # rules (text after the action costs the format reward).
    c.grpo.policy_loss = "reinforce"
    c.rollout.stop_at = "eos"
    c.reward_options.skip_special_tokens = True
    # --- As the released eval scripts (evaluation_*_visual_arft.py) do for coding: every turn one rebuilt user message,
    # its turn rules, generation to EOS (1024 new tokens, 5 turns), greedy with the checkpoint generation config's
    # repetition penalty 1.05, images at their aspect ratio through qwen-vl-utils and the checkpoint's processor,
    # a crop step's slices replaced by the question's box.
    c.eval.layout = "single_turn"
    c.eval.agent_rules = "paper"
    c.eval.stop_at = "eos"
    c.eval.repetition_penalty = 1.05
    c.eval.temperature = 0.0
    c.eval.max_turns = 5
    c.eval.max_new_tokens = 1024
    c.eval.max_total_tokens = 16384  # the script has no bound; longer chains end as max_tokens (counted)
    c.eval.crop_override = True
    c.eval.image_prefit = True
    c.eval.image_max_pixels = -1
    c.eval.resize = 0
    c.tools.topk = 4
    c.tools.search_format = "paper_exact"
  return c
