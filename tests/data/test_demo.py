"""The embedded demo: deterministic, in the published layouts, answerable only with tools."""
import hashlib
import json
import os

import numpy as np
from PIL import Image
import pytest

from varft.data import builders, demo, input_pipeline


def _tree_digest(root):
  digest = hashlib.sha256()
  for folder, _, files in sorted(os.walk(root)):
    for name in sorted(files):
      path = os.path.join(folder, name)
      digest.update(os.path.relpath(path, root).encode())
      with open(path, 'rb') as f:
        digest.update(f.read())
  return digest.hexdigest()


@pytest.fixture(scope='module')
def demo_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('demo'))
  demo.main(['--out', out])
  return out


def test_regenerating_drops_stale_prepared_data(tmp_path):
  paths = demo.generate(str(tmp_path / 'd'), sizes=demo.Sizes(coding_benchmark=9))
  assert len(builders.load('mat_benchmark/coding', manual_dir=paths['mat_dir'])) == 9
  demo.generate(str(tmp_path / 'd'), sizes=demo.Sizes(coding_benchmark=10))
  assert len(builders.load('mat_benchmark/coding', manual_dir=paths['mat_dir'])) == 10


def test_generation_is_deterministic(demo_dir, tmp_path):
  again = demo.generate(str(tmp_path / 'again'))
  assert _tree_digest(demo_dir) == _tree_digest(again['root'])
  other = demo.generate(str(tmp_path / 'other'), seed=1)
  assert _tree_digest(demo_dir) != _tree_digest(other['root'])


def test_builders_read_every_demo_file_without_skips(demo_dir, tmp_path):
  paths = demo.layout(demo_dir)
  data_dir = str(tmp_path / 'tfds')
  sizes = {}
  for name, manual_dir in [('mat_benchmark/coding', paths['mat_dir']), ('mat_benchmark/search', paths['mat_dir']),
                           ('mat_training/coding', paths['mat_dir']), ('mat_training/search', paths['mat_dir']),
                           ('multihop_qa/demo', paths['flashrag_dir'])]:
    src = builders.load(name, manual_dir=manual_dir, data_dir=data_dir)
    b = builders.prepare(name, manual_dir=manual_dir, data_dir=data_dir)
    assert all(r['total'] == 0 for r in builders.skip_report(b).values()), name
    sizes[name] = len(src)
  assert sizes == {
      'mat_benchmark/coding': 16,
      'mat_benchmark/search': 12,
      'mat_training/coding': 35,
      'mat_training/search': 21,
      'multihop_qa/demo': 12
  }

  coding = builders.load('mat_benchmark/coding', manual_dir=paths['mat_dir'], data_dir=data_dir)
  kinds = {k for i in range(len(coding)) for k in coding[i]['degradations']}
  assert kinds == set(demo.SINGLE_TYPES)
  splits = [coding[i]['split'] for i in range(len(coding))]
  assert splits == sorted(splits, key=lambda s: s != 'simple') and 'hard' in splits

  steps = builders.load('mat_training/coding', manual_dir=paths['mat_dir'], data_dir=data_dir)
  batch = next(input_pipeline.batches(steps, batch_size=5, seed=0, shard=(0, 1)))
  assert len(batch) == 5 and all(e['step_type'] in ('problem', 'code', 'answer') for e in batch)


def _run_fix(code, src, tmp_path):
  """Runs a reference fix (our own demo program, not model output) on an image."""
  src.save(tmp_path / 'in.png')
  code = (code.replace('path_to_input_image.jpg', str(tmp_path / 'in.png')).replace('path_to_output_image.jpg',
                                                                                    str(tmp_path / 'out.png')))
  exec(code, {})  # pylint: disable=exec-used
  return np.asarray(Image.open(tmp_path / 'out.png').convert('RGB'), np.float32)


@pytest.mark.parametrize('kinds', [('rotation90',), ('rotation180',), ('dark',), ('overexposure',), ('noise',),
                                   ('rotation90', 'dark'), ('rotation180', 'blur')])
def test_reference_code_restores_the_degraded_image(kinds, tmp_path):
  item = demo._coding_item(0, kinds, np.random.default_rng(0))  # pylint: disable=protected-access
  clean = np.asarray(item['clean'], np.float32)
  restored = _run_fix(item['code'], item['processed'], tmp_path)
  assert restored.shape == clean.shape
  error = np.abs(restored - clean).mean()
  if item['processed'].size == item['clean'].size:
    assert error < 0.5 * np.abs(np.asarray(item['processed'], np.float32) - clean).mean()
  if kinds in (('rotation90',), ('rotation180',)):
    assert error == 0


def test_crop_code_cuts_out_the_asked_region(tmp_path):
  item = demo._coding_item(0, ('crop',), np.random.default_rng(0))  # pylint: disable=protected-access
  cropped = _run_fix(item['code'], item['clean'], tmp_path)
  np.testing.assert_array_equal(cropped, np.asarray(item['processed'], np.float32))
  assert item['question'].startswith('Recognize the text within the [')


def test_search_answers_need_the_corpus(demo_dir):
  paths = demo.layout(demo_dir)
  with open(paths['corpus']) as f:
    docs = [json.loads(line) for line in f]
  assert all(set(d) == {'id', 'title', 'text'} for d in docs)
  with open(os.path.join(paths['mat_dir'], 'MAT-Benchmark', 'MAT-Search.json')) as f:
    bench = json.load(f)
  entities = {e['company'].split()[0].lower(): e for e in demo.world(0, demo.Sizes().companies)}
  for k, item in enumerate(bench):
    e = entities[item['image_path'][:-4]]
    # The question never names the company: the image does.
    assert e['company'] not in item['question']
    pages = [d for d in docs if item['answer'] in d['text']]
    assert pages, item
    naming_both = [d for d in pages if e['company'] in d['text']]
    if k < len(bench) // 2:  # simple: one search for the company finds the answer
      assert naming_both, item
    else:  # hard: no page names the company and holds the answer
      assert not naming_both, item
  with open(os.path.join(paths['flashrag_dir'], 'demo', 'test.jsonl')) as f:
    multihop = [json.loads(line) for line in f]
  assert {m['metadata']['hops'] for m in multihop} == {1, 2}
  assert all(' Works' in m['question'] for m in multihop)


def test_bm25_backend_serves_every_reference_search(demo_dir, tmp_path):
  from varft.tools import search  # the backend the demo's search runs use
  backend = search.build_index(demo.layout(demo_dir)['corpus'], str(tmp_path / 'index'))
  for e in demo.world(0, demo.Sizes().companies):
    for question, _, answers, hops in demo.questions(e):
      queries = demo.reference_queries(e, hops, question)
      assert len(queries) == hops
      results = backend.search(queries, 4)
      assert any(e['company'] == d.title for d in results[0]), queries
      assert any(answers[0] in d.text for d in results[-1]), (queries, answers)


def test_coding_reference_steps_fit_the_coding_demos_budgets(demo_dir):
  """Every reference step fits one demo turn (its update computes logits for that many positions per row) and its
  row fits the demo's rollout and SFT lengths, so no reference is cut or skipped."""
  from experiments import coding
  from varft import sft_data
  from varft.processing import chat
  config = coding.get_config('demo')
  steps = builders.load('mat_training/coding', manual_dir=demo.layout(demo_dir)['mat_dir'])
  r = config.rollout
  builder = sft_data.RowBuilder(chat.load_tokenizer(None), merge=2, min_pixels=r.image_min_pixels,
                                max_pixels=r.image_max_pixels, max_tool_output_tokens=r.max_tool_output_tokens,
                                think=config.sft.think)
  for i in range(len(steps)):
    prompt, row = builder.prompt(steps[i], with_context=True), builder.stepwise(steps[i])
    assert len(row.tokens) - len(prompt.tokens) <= r.max_new_tokens, steps[i]['id']
    assert len(prompt.tokens) + r.max_new_tokens <= min(r.max_total_tokens, max(r.length_buckets)), steps[i]['id']
  trajectories = sft_data.ReferenceSource(steps, 'multiturn')
  assert max(len(builder.multiturn(trajectories[i]).tokens) for i in range(len(trajectories))) <= max(
      config.sft.length_buckets)


def test_the_coding_demos_grpo_batches_mix_the_step_types(demo_dir):
  """The coding demo's batches of 4 steps (12 problem, 11 code, 12 answer) each hold 1-2 of every type, over
  three epochs; a plain shuffle of the same steps deals batches without one."""
  from experiments import coding
  config = coding.get_config('demo')
  steps = builders.load('mat_training/coding', manual_dir=demo.layout(demo_dir)['mat_dir'])

  def counts(balance_by):
    it = input_pipeline.batches(steps, batch_size=config.rollout.prompts_per_host, seed=config.seed, shard=(0, 1),
                                balance_by=balance_by)
    batches = [[e['step_type'] for e in next(it)] for _ in range(3 * len(steps) // 4)]
    return [[b.count(t) for t in ('problem', 'code', 'answer')] for b in batches]

  assert all(1 <= n <= 2 for c in counts(config.data.balance_by) for n in c)
  assert any(0 in c for c in counts(''))
