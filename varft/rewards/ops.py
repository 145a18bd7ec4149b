"""Jittable reward ops over padded arrays, and their registry.

Each op maps one trajectory's arrays (no batch axis) to a scalar; `batch_op` vmaps it. Inputs
come from `host.prepare_reward_inputs`. Padding conventions: events pad with `tags.PAD`, word and
problem ids with -1. Step types and tasks are the integer codes below.
"""
import jax
import jax.numpy as jnp

from varft import tags as grammar
from varft.rewards import tags

STEP_TYPES = ("none", "answer", "search", "code", "problem")
NONE, ANSWER, SEARCH, CODE, PROBLEM = range(len(STEP_TYPES))
TASKS = ("search", "coding")
SEARCH_TASK, CODING_TASK = range(len(TASKS))
# Problem ids are indices into the grammar's degradation list (host.PROBLEM_TYPES); its rotations earn partial credit.
ROTATION90, ROTATION180 = (grammar.DEGRADATIONS.index(r) for r in grammar.ROTATIONS)
_BIG = jnp.iinfo(jnp.int32).max


def _count(events, event):
  return jnp.sum(events == event)


def _has(events, *tag_events):
  return jnp.any(jnp.isin(events, jnp.asarray(tag_events)))


def _no_forbidden_tags(x):
  """The paper zeroes a step's accuracy when the completion holds another action's tag."""
  ev, step = x["events"], x["step_type"]
  answer_forbidden = jnp.where(x["task"] == SEARCH_TASK, _has(ev, tags.OPEN["search"]),
                               _has(ev, tags.OPEN["code"], tags.OPEN["problem"]))
  forbidden = jnp.select([step == ANSWER, step == SEARCH, step == CODE, step == PROBLEM], [
      answer_forbidden,
      _has(ev, tags.OPEN["answer"]),
      _has(ev, tags.OPEN["answer"], tags.OPEN["problem"]),
      _has(ev, tags.OPEN["answer"], tags.OPEN["code"])
  ], True)
  return ~forbidden


def format_accepts(events):
  """(4,) bool: does the event sequence fully match each of tags.FORMAT_PATTERNS?"""
  transitions, accepting = (jnp.asarray(t) for t in tags.format_tables())
  automaton = jnp.arange(transitions.shape[0])

  def step(state, event):
    return transitions[automaton, state, event], None

  final, _ = jax.lax.scan(step, jnp.zeros_like(automaton), events)
  return accepting[automaton, final]


def format_reward(x):
  """The paper's format reward: 1 for <think>…</think> then the right single action."""
  ev = x["events"]
  accepts = format_accepts(ev)
  answer_ok, search_ok, code_ok, problem_ok = (accepts[i] for i in range(4))
  counts = {tag: _count(ev, tags.OPEN[tag]) for tag in tags.TAGS}
  search_task_ok = ~((counts["answer"] >= 2) | (counts["search"] >= 2) | (counts["think"] >= 2)) & jnp.where(
      (counts["answer"] > 0) & (_count(ev, tags.CLOSE["answer"]) > 0), answer_ok & ~search_ok,
      (counts["search"] > 0) & (_count(ev, tags.CLOSE["search"]) > 0) & search_ok & ~answer_ok)
  repeated = (counts["answer"] >= 2) | (counts["code"] >= 2) | (counts["think"] >= 2) | (counts["problem"] >= 2)
  step = x["step_type"]
  step_ok = jnp.select([step == ANSWER, step == CODE, step == PROBLEM], [answer_ok, code_ok, problem_ok], False)
  coding_task_ok = ~repeated & step_ok
  return jnp.where(x["task"] == SEARCH_TASK, search_task_ok, coding_task_ok).astype(jnp.float32)


def _sorted_words(words):
  """Sorted ids with padding last, validity, and each id's occurrence rank within its run."""
  valid = words >= 0
  order = jnp.sort(jnp.where(valid, words, _BIG))
  positions = jnp.arange(words.shape[0])
  run_start = jnp.concatenate([jnp.ones((1,), bool), order[1:] != order[:-1]])
  rank = positions - jax.lax.cummax(jnp.where(run_start, positions, 0))
  return order, order != _BIG, run_start, rank


def _f1_from_counts(num_same, num_pred, num_gold):
  denom = jnp.maximum(num_pred + num_gold, 1)
  return jnp.where(num_same > 0, 2.0 * num_same / denom, 0.0)


def _answer_scores(x):
  """(set F1, multiset F1, EM), each (G,), of the predicted words against every gold answer."""
  pred, golds = x["pred_words"], x["gold_words"]
  order, valid, run_start, rank = _sorted_words(pred)
  num_pred = jnp.sum(valid)

  def against(gold):
    gold_valid = gold >= 0
    count_in_gold = jnp.sum((order[:, None] == gold[None, :]) & gold_valid[None, :], axis=1)
    num_gold = jnp.sum(gold_valid)
    set_same = jnp.sum(valid & run_start & (count_in_gold > 0))
    multiset_same = jnp.sum(valid & (count_in_gold > rank))
    width = min(pred.shape[0], gold.shape[0])
    exact = (num_pred == num_gold) & jnp.all(pred[:width] == gold[:width])
    return (_f1_from_counts(set_same, num_pred, num_gold), _f1_from_counts(multiset_same, num_pred,
                                                                           num_gold), exact.astype(jnp.float32))

  return jax.vmap(against)(golds)


def _answer_op(index):

  def op(x):
    best = jnp.max(jnp.where(x["gold_mask"], _answer_scores(x)[index], 0.0))
    return jnp.where((x["step_type"] == ANSWER) & _no_forbidden_tags(x), best, 0.0)

  return op


answer_f1 = _answer_op(0)
answer_f1.__doc__ = "Answer step: the paper's set-based token F1, max over gold answers."
answer_squad_f1 = _answer_op(1)
answer_squad_f1.__doc__ = "Answer step: SQuAD's multiset token F1, max over gold answers."
answer_em = _answer_op(2)
answer_em.__doc__ = "Answer step: exact match of the normalised answer, max over gold answers."


def query_similarity(x):
  """Search step: cosine of the query embeddings, zero below the threshold (paper: 0.5)."""
  pred, gold = x["pred_query_emb"], x["gold_query_emb"]
  cosine = jnp.dot(pred, gold) / jnp.maximum(jnp.linalg.norm(pred) * jnp.linalg.norm(gold), 1e-8)
  score = jnp.where(cosine >= x["similarity_threshold"], cosine, 0.0)
  return jnp.where((x["step_type"] == SEARCH) & _no_forbidden_tags(x), score, 0.0)


def code_step(x):
  """Code step (step-wise mode): the paper's constant for a code step without another action."""
  return jnp.where((x["step_type"] == CODE) & _no_forbidden_tags(x), x["code_step_reward"], 0.0)


def problem_match(x):
  """Problem step: 1 for the same degradation list, 0.5 for only the rotation of two."""
  pred, gold = x["pred_problems"], x["gold_problems"]
  num_pred, num_gold = jnp.sum(pred >= 0), jnp.sum(gold >= 0)
  same = (num_pred == num_gold) & jnp.all(
      jnp.sort(jnp.where(pred >= 0, pred, _BIG)) == jnp.sort(jnp.where(gold >= 0, gold, _BIG)))
  gold_has_90, gold_has_180 = jnp.any(gold == ROTATION90), jnp.any(gold == ROTATION180)
  only = lambda rotation: (num_pred == 1) & jnp.any(pred == rotation)
  half = (num_gold == 2) & jnp.where(gold_has_90, only(ROTATION90), gold_has_180 & only(ROTATION180))
  score = jnp.where(half, 0.5, same.astype(jnp.float32))
  return jnp.where((x["step_type"] == PROBLEM) & _no_forbidden_tags(x), score, 0.0)


def accuracy(x):
  """The paper's accuracy reward: whichever of the four step rewards fits the reference step (1.0 first when
  math_verify agrees, with `RewardOptions.math_verify`)."""
  score = answer_f1(x) + query_similarity(x) + code_step(x) + problem_match(x)
  return jnp.where(x["math_verified"], 1.0, score) if "math_verified" in x else score


def code_success(x):
  """Multi-turn: 1 when at least one code call ran and wrote an image."""
  return (x["num_code_success"] > 0).astype(jnp.float32)


def tool_validity(x):
  """Multi-turn: 1 when every tool call was well formed (vacuously so without calls)."""
  return x["all_valid"].astype(jnp.float32)


def failed_calls(x):
  """Multi-turn: minus the number of failed tool calls (the weight is the penalty per call)."""
  return -x["num_failed"].astype(jnp.float32)


# name -> (per-trajectory op, input groups it reads; see host.prepare_reward_inputs).
REGISTRY = {
    "format": (format_reward, ("text",)),
    "answer_f1": (answer_f1, ("text", "words")),
    "answer_em": (answer_em, ("text", "words")),
    "answer_squad_f1": (answer_squad_f1, ("text", "words")),
    "query_similarity": (query_similarity, ("text", "query")),
    "code_step": (code_step, ("text", "options")),
    "problem_match": (problem_match, ("text", "problems")),
    "accuracy": (accuracy, ("text", "words", "query", "options", "problems", "math")),
    "code_success": (code_success, ("tools",)),
    "tool_validity": (tool_validity, ("tools",)),
    "failed_calls": (failed_calls, ("tools",)),
}


def batch_op(name):
  """The batch version of a registered op: arrays with a leading batch axis -> (B,)."""
  op, _ = REGISTRY[name]
  scalar_keys = ("similarity_threshold", "code_step_reward")

  def batched(arrays):
    axes = {k: (None if k in scalar_keys else 0) for k in arrays}
    return jax.vmap(op, in_axes=(axes,))(arrays)

  return batched
