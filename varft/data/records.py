"""Published dataset records -> the uniform example schema.

Every dataset varft reads (MAT-Search / MAT-Coding benchmarks, MAT-Training step-wise samples,
FlashRAG multi-hop QA, the embedded demo) becomes the same kind of Python dict, which is what the
rollout and the trainer consume:

    {
      'id': str,                 # unique within its dataset
      'task': 'search' | 'coding' | 'multihop',
      'question': str,           # the bare question (no <query> tags, no reasoning chain)
      'answers': list[str],      # gold answers; scoring takes the max over them (may be empty for
                                 # step-wise samples whose trajectory has no answer step)
      'images': list[bytes],     # encoded PNG / JPEG bytes, in prompt order; [] for text-only
      'degradations': list[str], # MAT-Coding types (rotation90, ..., none); [] for other tasks
      'split': str,              # 'simple' | 'hard' for MAT benchmarks, 'train' for MAT-Training,
                                 # the file split ('dev', 'test', ...) for multi-hop QA
    }

Step-wise samples (MAT-Training, the paper's training data) add:

      'step_type': 'problem' | 'code' | 'search' | 'answer',  # the tag the reference step emits
      'context': str,            # the earlier steps of the trajectory, as text the prompt carries
      'solution': str,           # the reference step (e.g. "<answer> 81 </answer>")
      'gt': str,                 # the record's `gt`: the reference step with its <think> ('' when
                                 # the record has none); the paper's coding trainer scores it in
                                 # place of one sample per group (reward_options.gold_injection)

The functions here are pure over parsed JSON and files on disk; a record that cannot become an
example raises `MalformedRecord`, which the builders catch, count in a `SkipReport` and log, so a
long preparation never dies on one bad sample.
"""
from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator
import dataclasses
import io
import os
import re
from typing import Any

from PIL import Image

from varft import tags
from varft.processing import image as image_lib

TASKS = ('search', 'coding', 'multihop')
DEGRADATIONS = tags.DEGRADATIONS
STEP_TYPES = (tags.PROBLEM, tags.CODE, tags.SEARCH, tags.ANSWER)
TEXT_FIELDS = ('id', 'task', 'question', 'split', 'step_type', 'context', 'solution', 'gt')
LIST_TEXT_FIELDS = ('answers', 'degradations')

# `overexposure_60_proc.png` and `overexposure_60_ori.png` belong to one trajectory.
_TRAJECTORY_SUFFIX_RE = re.compile(r'_(proc|ori)$')


class MalformedRecord(ValueError):
  """A record (or its image) that cannot become an example; skipped and counted."""

  def __init__(self, reason: str, detail: str = ''):
    super().__init__(f'{reason}: {detail}' if detail else reason)
    self.reason = reason
    self.detail = detail


class UniqueIds:
  """Keeps the first example of each id: a duplicate would map two transcripts to one example."""

  def __init__(self):
    self._first: dict[str, str] = {}

  def claim(self, example_id: str, where: str) -> None:
    first = self._first.setdefault(example_id, where)
    if first != where:
      raise MalformedRecord('duplicate id', f'id {example_id!r} is already used at {first}')


@dataclasses.dataclass
class SkipReport:
  """Counts skipped records per reason and keeps the first few messages for the log."""
  source: str
  counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  first: list = dataclasses.field(default_factory=list)
  max_messages: int = 10

  def skip(self, where: str, error: MalformedRecord) -> None:
    self.counts[error.reason] += 1
    if len(self.first) < self.max_messages:
      self.first.append(f'{where}: {error}')

  @property
  def total(self) -> int:
    return sum(self.counts.values())

  def as_dict(self) -> dict:
    return {'total': self.total, 'reasons': dict(self.counts), 'first': list(self.first)}

  def summary(self) -> str:
    if not self.total:
      return f'{self.source}: no records skipped'
    reasons = ', '.join(f'{n} {r}' for r, n in sorted(self.counts.items()))
    lines = [f'{self.source}: skipped {self.total} record(s) ({reasons})']
    lines += [f'  {m}' for m in self.first]
    return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------
# Files (JSON and JSONL files are read by `varft.data.json_files`).

# Files hold bytes that are not UTF-8 as lone surrogates (`json_files` decodes with
# `surrogateescape`) so that one bad record does not reject its file; a field holding one is
# rejected when it is read.
_LONE_SURROGATE = re.compile('[\ud800-\udfff]')


def resolve_image(image_dir: str, name: str) -> str:
  """Finds `name` (as written in a record) under `image_dir`; tolerates absolute paths from the
  authors' cluster by falling back to the file name."""
  candidates = [os.path.join(image_dir, name), os.path.join(image_dir, os.path.basename(name))]
  if os.path.isabs(name):
    candidates.insert(0, name)
  for path in candidates:
    if os.path.isfile(path):
      return path
  raise MalformedRecord('missing image', f'{name!r} not found in {image_dir}')


def read_image(path: str) -> bytes:
  """Returns encoded PNG/JPEG bytes of an image file after checking that it decodes fully and
  that the image processor accepts its size (the rollout would reject it otherwise).

  Other formats (WebP, BMP, GIF, ...) are re-encoded as PNG so that every consumer only needs
  PNG/JPEG support.
  """
  with open(path, 'rb') as f:
    data = f.read()
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      size, fmt = image.size, image.format
      if fmt not in ('PNG', 'JPEG'):
        out = io.BytesIO()
        eight_bit = image_lib.to_8bit(image)  # high-bit-depth TIFFs scaled, not clipped
        eight_bit.convert('RGBA' if 'A' in eight_bit.getbands() else 'RGB').save(out, format='PNG')
        data = out.getvalue()
  except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
    raise MalformedRecord('corrupt image', f'{path}: {e}') from e
  try:
    image_lib.smart_resize(size[1], size[0])  # the processor's aspect and size limits
  except image_lib.ImageError as e:
    raise MalformedRecord('bad image size', f'{path}: {e}') from None
  return data


# ---------------------------------------------------------------------------------------------
# Field helpers.


def _utf8(value: str, key: str) -> str:
  if _LONE_SURROGATE.search(value):
    raise MalformedRecord('invalid utf-8', f'{key} holds text that is not UTF-8: {value!r:.80}')
  return value


def _text(record: dict, key: str, *, required: bool = True) -> str:
  value = record.get(key)
  if value is None and not required:
    return ''
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    value = str(value)
  if not isinstance(value, str) or (required and not value.strip()):
    raise MalformedRecord(f'bad {key}', f'expected a non-empty string, got {value!r:.80}')
  return _utf8(value, key)


def _answer_list(record: dict, key: str) -> list[str]:
  value = record.get(key)
  if isinstance(value, (str, int, float)) and not isinstance(value, bool):
    value = [value]
  if (not isinstance(value, list) or not value or not all(isinstance(v, (str, int, float)) for v in value)):
    raise MalformedRecord(f'bad {key}', f'expected a string or a list of strings, got {value!r:.80}')
  return [_utf8(str(v), key) for v in value]


def _record_id(record: dict, fallback: str) -> str:
  value = record.get('id')
  return fallback if value is None or value == '' else _utf8(str(value), 'id')


def strip_query(problem: str) -> tuple[str, str]:
  """Splits a MAT-Training `problem` into (question, text after the query).

  The published prompts wrap the question as `<query> ... </query>`; anything after it is an
  earlier reasoning chain that belongs to the step's context.
  """
  match = tags.tag_re(tags.QUERY).search(problem)
  if not match:
    return problem.strip(), ''
  return match.group(1).strip(), problem[match.end():].strip()


def parse_degradations(text: str) -> list[str]:
  """`"<problem> {'rotation90', 'dark'} </problem>"` -> ['rotation90', 'dark']."""
  names = tags.QUOTED_NAME_RE.findall(text) or tags.WORD_RE.findall(text)
  unknown = [n for n in names if n not in DEGRADATIONS]
  if unknown or not names:
    raise MalformedRecord('unknown degradation', f'{text!r:.120}')
  return list(dict.fromkeys(names))


def _degradation_list(record: dict) -> list[str]:
  value = record.get('type')
  if isinstance(value, str):
    value = value.split('+')
  if not isinstance(value, list) or not value or any(v not in DEGRADATIONS for v in value):
    raise MalformedRecord('unknown degradation', f'type={value!r:.80}')
  return list(value)


# ---------------------------------------------------------------------------------------------
# Benchmarks.


def mat_search_example(record: Any, position: int, total: int, image_dir: str) -> dict:
  """MAT-Search record `{id, question, answer, image_path}` -> example.

  The published file has no split field: its first half is 'simple', the second 'hard'
  (75 + 75 of 150). A record that carries 'split' keeps it.
  """
  if not isinstance(record, dict):
    raise MalformedRecord('not an object', f'{record!r:.80}')
  split = record.get('split') or ('simple' if position < total // 2 else 'hard')
  return {
      'id': _record_id(record, str(position)),
      'task': 'search',
      'question': _text(record, 'question'),
      'answers': _answer_list(record, 'answer' if 'answer' in record else 'answers'),
      'images': [read_image(resolve_image(image_dir, _text(record, 'image_path')))],
      'degradations': [],
      'split': str(split),
  }


def mat_coding_example(record: Any, position: int, image_dir: str) -> dict:
  """MAT-Coding record `{id, question, answers[], ori_image_path, processed_image_path, type[],
  split}` -> example. `crop` items show the original image (the model crops it); the others
  show the processed (degraded) one, as the paper's evaluation does."""
  if not isinstance(record, dict):
    raise MalformedRecord('not an object', f'{record!r:.80}')
  degradations = _degradation_list(record)
  image_key = 'ori_image_path' if 'crop' in degradations else 'processed_image_path'
  split = record.get('split')
  if split not in ('simple', 'hard'):
    raise MalformedRecord('bad split', f'split={split!r}')
  return {
      'id': _record_id(record, str(position)),
      'task': 'coding',
      'question': _text(record, 'question'),
      'answers': _answer_list(record, 'answers'),
      'images': [read_image(resolve_image(image_dir, _text(record, image_key)))],
      'degradations': degradations,
      'split': split,
  }


def multihop_example(record: Any, line_no: int, split: str) -> dict:
  """FlashRAG record `{id, question, golden_answers, ...}` -> text-only example."""
  if not isinstance(record, dict):
    raise MalformedRecord('not an object', f'{record!r:.80}')
  return {
      'id': _record_id(record, f'{split}_{line_no - 1}'),
      'task': 'multihop',
      'question': _text(record, 'question'),
      'answers': _answer_list(record, 'golden_answers'),
      'images': [],
      'degradations': [],
      'split': split,
  }


# ---------------------------------------------------------------------------------------------
# MAT-Training step-wise samples.


def step_type(record: dict, use_declared: bool = True) -> str:
  """The step a record trains: the tag its `solution` emits, checked against its `type`
  ('pre_code' -> 'code') when `use_declared` and the record has one. The paper's search trainer
  reads only image_path / problem / solution, so search data is judged by the tag alone."""
  solution = _text(record, 'solution')
  emitted = [m.group(1) for m in tags.ACTION_RE.finditer(solution)]
  if len(set(emitted)) != 1:
    raise MalformedRecord('bad solution', f'expected exactly one step tag in {solution!r:.120}')
  declared = record.get('type')
  if declared is None or not use_declared:
    return emitted[0]
  declared = str(declared).removeprefix('pre_')
  if declared not in STEP_TYPES or declared != emitted[0]:
    raise MalformedRecord('bad type', f'type={record.get("type")!r} but solution emits <{emitted[0]}>')
  return declared


def trajectory_id(image_path: str, question: str) -> tuple[str, str]:
  """Steps of one trajectory share the image stem (minus _proc/_ori) and the question."""
  stem = os.path.splitext(os.path.basename(image_path))[0]
  return _TRAJECTORY_SUFFIX_RE.sub('', stem), question


def _tag_content(solution: str, tag: str) -> str:
  found = tags.content(solution, tag)
  return '' if found is None else found.strip()


def mat_training_examples(records: Iterable[Any], image_dir: str, task: str, report: SkipReport,
                          where: Callable[[int], str] = 'row {}'.format) -> Iterator[tuple[int, dict]]:
  """MAT-Training rows `{type, image_path, problem, context, solution, gt}` -> (row, example).

  Rows are grouped into trajectories so that every step carries the trajectory's final answer
  (from its `<answer>` step) and, for coding, its degradations (from its `<problem>` step).
  `where(row)` names a row in skip messages.
  """
  if task not in ('search', 'coding'):
    raise ValueError(f'task must be search or coding, got {task!r}')
  parsed = []
  trajectories = collections.defaultdict(dict)
  for row, record in enumerate(records):
    try:
      if not isinstance(record, dict):
        raise MalformedRecord('not an object', f'{record!r:.80}')
      step = step_type(record, use_declared=task == 'coding')
      if task == 'search' and step not in ('search', 'answer'):
        raise MalformedRecord('bad type', f'{step!r} step in search data')
      if task == 'coding' and step == 'search':
        raise MalformedRecord('bad type', 'search step in coding data')
      question, chain = strip_query(_text(record, 'problem'))
      context = _text(record, 'context', required=False)
      context = '\n'.join(t for t in (chain, context.strip()) if t)
      image_path = _text(record, 'image_path')
      solution = record['solution']
      gt = _text(record, 'gt', required=False)
      traj = trajectory_id(image_path, question)
      if step == 'answer':
        trajectories[traj]['answers'] = [_tag_content(solution, 'answer')]
      if step == 'problem':
        trajectories[traj]['degradations'] = parse_degradations(_tag_content(solution, 'problem'))
      parsed.append((row, step, question, context, image_path, solution, gt, traj))
    except MalformedRecord as e:
      report.skip(where(row), e)

  for row, step, question, context, image_path, solution, gt, traj in parsed:
    try:
      image = read_image(resolve_image(image_dir, image_path))
    except MalformedRecord as e:
      report.skip(where(row), e)
      continue
    yield row, {
        'id': f'{row}:{traj[0]}:{step}',
        'task': task,
        'question': question,
        'answers': trajectories[traj].get('answers', []),
        'images': [image],
        'degradations': trajectories[traj].get('degradations', []),
        'split': 'train',
        'step_type': step,
        'context': context,
        'solution': solution,
        'gt': gt,
    }


# ---------------------------------------------------------------------------------------------
# Reading back.


def decode(raw: dict) -> dict:
  """A stored example (tfds returns text as bytes) -> the uniform schema with `str` text."""
  out = {}
  for key, value in raw.items():
    if key in TEXT_FIELDS:
      out[key] = value.decode('utf-8') if isinstance(value, bytes) else str(value)
    elif key in LIST_TEXT_FIELDS:
      out[key] = [v.decode('utf-8') if isinstance(v, bytes) else str(v) for v in value]
    elif key == 'images':
      out[key] = [bytes(v) for v in value]
    else:
      out[key] = value
  return out
