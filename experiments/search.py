"""Visual-ARFT search agent (MAT-Search): Qwen2.5-VL + a search tool, trained with GRPO.

    python -m varft.main --config=experiments/search.py:demo --workdir=/tmp/search_demo
    python -m varft.main --config=experiments/search.py:7b,multiturn --workdir=... \\
        --config.model.hf_dir=/ckpt/Qwen2.5-VL-7B-Instruct --config.data.mat_dir=/data/MAT \\
        --config.tools.search.corpus=/data/wiki.jsonl
    ... --config.mode=eval   (MAT-Search + multi-hop QA, predictions in the paper's JSON format)

arg: `demo` | `3b` | `7b`, optionally with `,stepwise` (default: the paper's step-wise training on
rft_agent_search_20.json) or `,multiturn` (full rollouts with real searches, outcome reward), and `,paper` (as the
released code does where varft differs: math_verify in the accuracy reward, REINFORCE ratio, samples to EOS scored
by the fullmatch format rules; see the README). Every value the recipe sets is below; the rest are the defaults of
`varft/defaults.py`.
"""
from varft import defaults


def get_config(arg="demo"):
  size, mode, paper = defaults.parse_agent_arg(arg, "experiments/search.py")
  c = defaults.base_config()
  c.task = "agent"
  c.rollout.mode = mode
  c.paper = paper

  # --- The task: MAT-Training's search trajectories, a BM25 index, MAT-Search and the multi-hop QA benchmarks.
  c.data.train = "mat_training/search"
  c.reward_options.task = "search"
  c.tools.use_code = False
  c.tools.search.name = "bm25"
  if mode == "stepwise":
    c.rewards = [("accuracy", 1.0), ("format", 1.0)]
    c.reward_options.math_verify = paper  # the released search trainer tries math_verify first
  else:
    c.rewards = [("answer_f1", 1.0), ("format", 0.5), ("failed_calls", 0.1)]
  c.eval.benchmarks = ("mat_search", "2wiki", "hotpotqa", "musique", "bamboogle")

  if size == "demo":
    # --- The demo recipe: the tiny model on the embedded demo, a supervised warm-up on the reference steps, then
    # GRPO; a few minutes on 2 CPU cores. The tiny model learns the format and the tool calls, not to read images.
    c.data.demo = True
    c.model.name = "tiny"
    c.model.dtype = "float32"
    c.model.remat = False
    # Dense XLA attention: at 16 rows x 1024 tokens x 4 heads its scores are small, and on CPU it is ~2.5x faster
    # (forward + backward) than the chunked online softmax `auto` picks there (benchmarks/demo_update_profile.py).
    c.model.attention = "dot_product"
    # A random 10M model needs ~100 updates to write the template in order: many small, short batches.
    c.sft.steps = 150
    c.sft.batch_size = 2
    c.sft.learning_rate = 1.5e-2
    c.sft.warmup_steps = 10
    c.sft.schedule = "cosine"  # annealing to 0 brings the last loss down: the tags come out right more often
    c.sft.think = "step"  # the gt thinks describe the image, which the tiny model cannot read
    c.sft.length_buckets = (768,)  # the longest demo reference (a two-hop answer step) is ~760 tokens
    # GRPO steps after the warm-up: after 16 the format is still climbing; from ~20 on it hovers at ~0.9 (per step
    # 0.56-1.0), and 32 steps end at 0.979 / 0.896 over the last 3 on seeds 0 / 1 (BENCHMARKS.md, "Search demo:
    # more GRPO steps"), ~5 s a step on 2 idle cores.
    c.total_steps = 32
    c.checkpoint_every = 80
    c.samples_every = 10
    c.eval_every = 1000  # at the end only
    c.export_hf = True
    if mode == "stepwise":
      # The tiny model's accuracy stays ~0.1 (it cannot read the logo), so GRPO's rise is the format being learnt;
      # at 2x a slipped tag outweighs any accuracy difference within a group. Two seeds: end format 0.81-0.92 ->
      # 0.88-0.90, rise +3.8..4.6 -> +4.9..12 stds (BENCHMARKS.md, "Search demo recipe (issue 16, third pass)").
      c.rewards = [("accuracy", 1.0), ("format", 2.0)]
      # Word overlap whether or not the `dense` extra is installed (`auto` would pick MiniLM under `.[test]`): the
      # demo's run, and its test, give the same numbers on the base install and the test install.
      c.reward_options.query_similarity = "lexical"
    c.grpo.beta = 0.0  # a few RL steps from the warmed-up policy: no KL anchor, no reference forward pass
    c.optim.learning_rate = 1e-3
    c.optim.schedule = "constant"
    # GRPO starts from fresh AdamW moments: its first update moves every parameter with a gradient by ~lr (the
    # 152k tied embedding rows too), a kick that undoes part of the warm-up; 3 steps of warm-up ramp it in.
    c.optim.warmup_steps = 3
    c.rollout.prompts_per_host = 4  # 16 rollouts per step: a step's mean reward is not just which prompts came up
    c.rollout.num_samples = 4
    c.rollout.temperature = 0.5  # the warmed-up tiny model writes the format at 0.5 more often than not
    c.rollout.max_turns = 2
    c.rollout.max_new_tokens = 40
    c.rollout.max_total_tokens = 1024
    c.rollout.max_tool_output_tokens = 96
    # A step's prompt is 356-735 tokens, so its rows (prompt + a 40-token turn) nearly always fit 768: prefill and
    # update compute 768 positions a row, not 1024 (the update ~1.9x faster on CPU, the results bit for bit the
    # same: BENCHMARKS.md, "The search demo's rows in a 768-token bucket").
    c.rollout.length_buckets = (768, 1024)
    c.rollout.chunk_buckets = (128,)
    c.rollout.patch_buckets = (1024,)
    c.rollout.image_max_pixels = 112 * 112  # 16 image tokens: the tiny model cannot read images anyway
    c.tools.code.prewarm = False
    c.samples_per_step = 4
    c.eval.benchmarks = ("mat_search", "multihop_demo")
    c.eval.num_prompts = 8
    c.eval.batch_size = 4
    c.eval.max_turns = 2
    return c

  # --- The paper's recipe (Visual-ARFT scripts, 8 GPUs): G=8 samples per prompt, 1 prompt per GPU x 2 accumulation
  # steps (16 prompts per update), beta 0.04, lr 1e-6 (AdamW with HF defaults: linear decay, no warm-up, clip 1.0),
  # bf16 with gradient checkpointing, max_pixels 401408 with inputs resized to 720x720, one PPO epoch (mu = 1);
  # 400 epochs over the 63 step samples of 20 trajectories (~1600 updates).
  c.model.name = size
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.remat = True
  c.total_steps = 1600
  c.checkpoint_every = 100
  c.keep_checkpoint_steps = (200,)  # the step the paper reports
  c.samples_every = 20
  c.eval_every = 400
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
    # --- As the released eval scripts (evaluation_*_visual_arft.py) do for search: every turn one rebuilt user message,
    # its turn rules, generation to EOS (2048 new tokens, 5 turns), greedy with the checkpoint generation config's
    # repetition penalty 1.05, images at their aspect ratio through qwen-vl-utils and the checkpoint's processor,
    # Serper's top 4 snippets rendered as the script does.
    c.eval.layout = "single_turn"
    c.eval.agent_rules = "paper"
    c.eval.stop_at = "eos"
    c.eval.repetition_penalty = 1.05
    c.eval.temperature = 0.0
    c.eval.max_turns = 5
    c.eval.max_new_tokens = 2048
    c.eval.max_total_tokens = 16384  # the script has no bound; longer chains end as max_tokens (counted)
    c.eval.crop_override = False
    c.eval.image_prefit = True
    c.eval.image_max_pixels = -1
    c.eval.resize = 0
    c.tools.topk = 4
    c.tools.search_format = "paper_exact"
    c.tools.search.name = "serper"
  return c
