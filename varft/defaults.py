"""Every config key the trainer reads, with defaults; experiment files (`experiments/*.py`) start from this."""
from __future__ import annotations

import ml_collections

from varft.processing import image as image_lib


def sharding_config() -> ml_collections.ConfigDict:
  """`config.sharding.rules`: logical axis -> the mesh axes (`data`, `fsdp`, `tensor`) it is split over, () for
  replicated, or `unconstrained` (left to XLA). Parameters name their axes where the model creates them
  (`PARAM_AXES` in varft/models/qwen25vl); activations name theirs at the layer boundaries (`sharding.constrain`)."""
  return ml_collections.ConfigDict({
      "rules": {
          "batch": ("data", "fsdp"),
          "vocab": ("tensor",),
          "embed": ("fsdp",),
          "heads": ("tensor",),
          "kv_heads": ("tensor",),
          "mlp": ("tensor",),
          "layers": (),
          # Activations: rows over the batch axes, features whole (the fsdp axis shards weights, not activations).
          "length": (),
          "act_embed": (),
          "act_heads": ("tensor",),
          "act_kv_heads": ("tensor",),
          "act_mlp": ("tensor",),
          "act_vocab": ("tensor",),
          # The loss's vocabulary-parallel logits: rows whole within a data shard, the vocabulary over fsdp x tensor.
          "loss_batch": ("data",),
          "loss_vocab": ("fsdp", "tensor"),
          # Vision patches: left to the image table's layout (a per-device table keeps them on their device).
          "patches": "unconstrained",
      }
  })


def base_config() -> ml_collections.ConfigDict:
  """The defaults; a key missing here cannot be overridden from the command line."""
  c = ml_collections.ConfigDict()
  c.mode = "train"  # train (GRPO, after sft.steps of warm-up) | sft (supervised only) | eval
  c.task = "agent"  # agent (data + multi-turn rollouts with tools + rewards) | echo (the loop's sanity task)
  c.seed = 0
  c.total_steps = 100  # rollout steps; each runs grpo.epochs optimizer updates
  c.log_every = 1
  c.checkpoint_every = 50
  c.keep_checkpoints = 3
  c.keep_checkpoint_steps = ()  # also saved, and never deleted by keep_checkpoints (the paper's evaluated steps)
  c.async_checkpoints = True
  c.samples_every = 10  # write readable sample rollouts (HTML + PNGs) every N steps; 0 = never
  c.samples_per_step = 8  # trajectories in each samples page
  c.eval_every = 0  # evaluate every N steps and at the end; 0 = never
  c.export_hf = True
  c.distributed = "auto"  # jax.distributed.initialize(): auto | True | False
  c.paper = False  # the released Visual-ARFT code's behaviour where varft differs (experiment arg `,paper`)
  # auto: resume from the workdir's checkpoints when they were made with the same recipe (varft.checkpoint.recipe),
  # refuse otherwise, naming the keys that differ | force: resume them under this config anyway.
  c.resume = "auto"
  # auto: before the weights load, compile one step's programs at their shapes (varft.plan) and stop with one line
  # when one would not fit the devices' memory (GPU/TPU only: CPU reports no limit) | off.
  c.plan_check = "auto"

  c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
  c.sharding = sharding_config()

  c.model = ml_collections.ConfigDict()
  c.model.name = "tiny"  # a preset of varft.models.qwen25vl.config (tiny | 3b | 7b) ...
  c.model.hf_dir = ""  # ... or an HF Qwen2.5-VL checkpoint folder to load
  c.model.init_seed = 0
  c.model.dtype = "bfloat16"  # compute dtype
  c.model.param_dtype = "float32"  # master weights
  c.model.remat = True
  c.model.attention = "auto"  # auto (cuDNN on GPU, Pallas flash on TPU, chunked XLA else) | xla_chunked | ...

  c.grpo = ml_collections.ConfigDict()
  c.grpo.beta = 0.04
  c.grpo.eps_low = 0.2
  c.grpo.eps_high = 0.2
  c.grpo.advantage = "std"  # std | no_std (Dr. GRPO) | leave_one_out
  c.grpo.aggregation = "sequence_mean"  # sequence_mean (the paper) | token_mean
  c.grpo.policy_loss = "clipped"  # clipped | reinforce (the released trainers: ratio exp(logp - sg(logp)) == 1)
  c.grpo.epochs = 1  # mu: updates per rollout batch
  c.grpo.tis_cap = 0.0  # > 0: truncated sampler/trainer importance correction
  c.grpo.micro_batches = 1
  c.grpo.logits_chunk = 256
  c.grpo.train_vision = True

  # Supervised warm-up on reference trajectories (varft.sft): mode=sft runs only it; mode=train runs sft.steps
  # updates first, then total_steps GRPO steps, in one run (one step counter, checkpoints in either phase).
  c.sft = ml_collections.ConfigDict()
  c.sft.steps = 0
  c.sft.format = "auto"  # stepwise (one reference step per row) | multiturn (whole trajectories) | auto (rollout.mode)
  c.sft.data = ""  # the reference records; '' = data.train (MAT-Training's reference steps)
  c.sft.batch_size = 8  # rows per host and update
  c.sft.micro_batches = 1
  c.sft.aggregation = "token_mean"  # token_mean | sequence_mean
  c.sft.learning_rate = 1e-5
  c.sft.schedule = "cosine"
  c.sft.warmup_steps = 0
  c.sft.length_buckets = ()  # () = rollout.length_buckets
  c.sft.think = "gt"  # gt (the record's own think) | step (a short per-step sentence: for models too small to read)

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

  # Rollouts: the trainer's batch keys plus every field of varft.rollout.RolloutConfig.
  c.rollout = ml_collections.ConfigDict()
  c.rollout.prompts_per_host = 8
  c.rollout.num_samples = 8  # G
  # Sampling weights tensor-parallel over this many of a host's devices (rows over the rest): auto = the least
  # degree at which they take at most a quarter of a device's memory (rollout_sharding.resolve_tensor_parallel;
  # the planner resolves it for its --accelerator), or a number.
  c.rollout.tensor_parallel = "auto"
  c.rollout.temperature = 1.0
  c.rollout.top_k = 0
  c.rollout.top_p = 1.0
  c.rollout.mode = "stepwise"  # stepwise (the paper) | multiturn (real tool calls, outcome reward)
  c.rollout.max_turns = 5
  c.rollout.max_new_tokens = 512
  c.rollout.max_total_tokens = 4096
  c.rollout.max_tool_output_tokens = 512
  c.rollout.length_buckets = (256, 512, 1024, 2048, 4096)
  c.rollout.chunk_buckets = (32, 64, 128, 256, 512, 1024)
  c.rollout.patch_buckets = (1024, 4096, 16384)
  c.rollout.image_min_pixels = image_lib.DEFAULT_MIN_PIXELS
  c.rollout.image_max_pixels = image_lib.PAPER_MAX_PIXELS
  c.rollout.system_prompt = "auto"
  c.rollout.stop_at = "closing_tag"  # closing_tag (stop at the first </search>, </code>, ...) | eos (the released code)
  c.rollout.repetition_penalty = 1.0  # transformers' semantics over each row's context; 1 = off
  c.rollout.layout = "chat"  # chat (turns appended, one cache) | single_turn (each turn one rebuilt user message)
  c.rollout.agent_rules = "varft"  # varft | paper (the released eval scripts' turn rules, varft.paper_rules)
  c.rollout.crop_override = False  # a crop step's [a:b, c:d] slices take the question's box (released MAT-Coding eval)
  c.rollout.image_prefit = False  # resize as qwen-vl-utils does before the processor (the released scripts)
  # schedule: continuous (varft.scheduler: a row that stops goes to its tools while the others decode, and rejoins
  # once rejoin_fraction of the unfinished rows are ready; a generate call returns after resume_steps while tools
  # are out, or once exit_fraction of its rows stopped) | lockstep (every turn: all rows decode, all tools, all extend).
  c.rollout.schedule = "continuous"
  c.rollout.resume_steps = 16
  c.rollout.exit_fraction = 0.0625
  c.rollout.rejoin_fraction = 0.0625

  # Data (varft.data): the downloaded folders, or the embedded demo generated under the workdir.
  c.data = ml_collections.ConfigDict()
  c.data.demo = False
  c.data.mat_dir = ""  # holds MAT-Benchmark/ and MAT-Training/
  c.data.flashrag_dir = ""  # holds <dataset>/<split>.jsonl
  c.data.tfds_dir = ""  # prepared TFDS data; '' = <manual dir>/tfds
  c.data.train = "mat_training/search"
  c.data.train_split = ""
  c.data.resize = 0  # > 0: resize every input image to resize x resize first (the paper: 720)
  # A record field each RL batch holds in about its share of the data (e.g. step_type: every batch mixes problem,
  # code and answer steps alike); '' = a plain shuffle, as the paper's trainer.
  c.data.balance_by = ""

  # Tools (varft.tools.executor.ToolExecutor config).
  c.tools = ml_collections.ConfigDict()
  c.tools.max_workers = 8
  c.tools.topk = 4
  c.tools.search_format = "paper"
  c.tools.search_timeout_s = 60.0
  c.tools.max_doc_chars = 1000
  # Empty values are left out: bm25/dense use index_dir + corpus, http a Search-R1 `url`, serper SERPER_API_KEY.
  c.tools.search = ml_collections.ConfigDict({"name": "bm25", "index_dir": "", "corpus": "", "url": ""})
  c.tools.use_code = True
  c.tools.code = ml_collections.ConfigDict({"timeout_s": 10.0, "max_concurrency": 4, "prewarm": True})

  # Rewards (varft.rewards): (name, weight) pairs and the paper's options.
  c.rewards = [("accuracy", 1.0), ("format", 1.0)]
  # query_similarity: the step-wise search reward's encoder: minilm (the paper's all-MiniLM-L6-v2) | lexical (word
  # overlap, needs nothing) | auto (minilm when installed, else lexical, said once; the choice is in the metrics).
  # gold_injection: score one sample per group as the record's gt (the paper's coding trainer); skip_special_tokens:
  # score the sampled tokens decoded without <|im_end|> & co. (the released trainers; step-wise only).
  c.reward_options = ml_collections.ConfigDict({
      "task": "search",
      "similarity_threshold": 0.5,
      "code_step_reward": 0.9,
      "query_similarity": "auto",
      "math_verify": False,
      "gold_injection": False,
      "skip_special_tokens": False
  })

  c.eval = ml_collections.ConfigDict()
  c.eval.benchmarks = ("mat_search",)  # names in varft.eval.score.BENCHMARKS
  c.eval.num_prompts = 0  # 0 = the whole benchmark
  c.eval.batch_size = 8
  c.eval.temperature = 0.0  # greedy
  c.eval.max_turns = 5
  c.eval.prompt = "agent"  # agent | direct (the paper's direct-answer baselines: one turn, no tools; varft.eval.direct)
  c.eval.direct_max_new_tokens = 2048  # the direct-answer reply's budget (the baseline scripts' max_new_tokens)
  c.eval.checkpoint_step = -1  # eval mode: the checkpoint to evaluate (-1 = latest, or the initial weights)
  # The evaluation engine over config.rollout (varft.eval.settings): same meaning as the rollout keys.
  c.eval.layout = "chat"
  c.eval.agent_rules = "varft"
  c.eval.stop_at = "closing_tag"
  c.eval.repetition_penalty = 1.0
  c.eval.crop_override = False
  c.eval.image_prefit = False
  c.eval.max_new_tokens = 0  # 0 = rollout.max_new_tokens
  c.eval.max_total_tokens = 0  # 0 = rollout.max_total_tokens
  c.eval.image_max_pixels = 0  # 0 = rollout.image_max_pixels | -1 = the checkpoint's processor (model.hf_dir)
  c.eval.resize = -1  # -1 = data.resize | 0 = keep each image's aspect ratio | N = N x N
  return c


AGENT_SIZES = ("demo", "3b", "7b")
AGENT_MODES = ("stepwise", "multiturn")


def parse_agent_arg(arg: str, experiment: str) -> tuple[str, str, bool]:
  """(size, mode, paper) of an agent experiment's `size[,stepwise|multiturn][,paper]` argument (mode default:
  stepwise; `paper`, step-wise only: behave as the released Visual-ARFT code does where it differs)."""
  size, *options = arg.split(",")
  paper = "paper" in options
  modes = [o for o in options if o != "paper"]
  mode = modes[0] if modes else "stepwise"
  if size not in AGENT_SIZES or len(modes) > 1 or mode not in AGENT_MODES or (paper and mode != "stepwise"):
    raise ValueError(f"{experiment}: arg {arg!r} must be demo|3b|7b[,stepwise|multiturn][,paper] "
                     "(paper: step-wise only)")
  return size, mode, paper
