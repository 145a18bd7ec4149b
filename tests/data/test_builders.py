"""TFDS builders: published layouts -> array_record -> uniform examples; skips counted."""
import io
import json
import os

from PIL import Image
import pytest

from varft.data import builders


def test_mat_coding_benchmark_reads_real_cases_and_skips_bad_ones(mat_dir, tmp_path):
  src = builders.load('mat_benchmark/coding', manual_dir=mat_dir, data_dir=str(tmp_path / 'tfds'))
  examples = [src[i] for i in range(len(src))]
  assert [e['id'] for e in examples] == ['12', '22', '63', '119']  # published order kept
  by_id = {e['id']: e for e in examples}
  assert by_id['12'] == {
      **by_id['12'], 'task': 'coding',
      'split': 'simple',
      'answers': ['1 Can (473ml)'],
      'degradations': ['rotation180']
  }
  assert by_id['119']['degradations'] == ['crop'] and by_id['119']['split'] == 'hard'
  assert by_id['22']['question'] == '从图中提取: 发票号码, 发票代码'  # CJK text round-trips
  assert by_id['22']['answers'] == ["{'发票号码': '16734841', '发票代码': '112001970102'}"]
  # crop items show the original image, the others the processed one.
  with open(os.path.join(mat_dir, 'MAT-Benchmark', 'MAT-Coding-image', 'crop_8_ori.png'), 'rb') as f:
    assert by_id['119']['images'] == [f.read()]
  assert Image.open(io.BytesIO(by_id['63']['images'][0])).size[0] > 0
  report = builders.skip_report(
      builders.prepare('mat_benchmark/coding', manual_dir=mat_dir, data_dir=str(tmp_path / 'tfds')))
  assert report['test']['total'] == 2
  assert report['test']['reasons'] == {'corrupt image': 1, 'unknown degradation': 1}


def test_mat_search_benchmark_splits_halves_and_skips(mat_dir, tmp_path):
  src = builders.load('mat_benchmark/search', manual_dir=mat_dir, data_dir=str(tmp_path / 'tfds'))
  examples = [src[i] for i in range(len(src))]
  assert len(examples) == 6
  # 8 records in the file: the first 4 are simple, the rest hard (75 + 75 of 150 in MAT-Search).
  assert [e['split'] for e in examples] == ['simple'] * 4 + ['hard'] * 2
  assert examples[0]['answers'] == ['Answer 0'] and examples[0]['task'] == 'search'
  assert examples[0]['degradations'] == [] and len(examples[0]['images']) == 1
  b = builders.prepare('mat_benchmark/search', manual_dir=mat_dir, data_dir=str(tmp_path / 'tfds'))
  assert builders.skip_report(b)['test']['reasons'] == {'missing image': 1, 'bad question': 1}


def test_mat_training_coding_steps(mat_dir, tmp_path):
  src = builders.load('mat_training/coding', manual_dir=mat_dir, data_dir=str(tmp_path / 'tfds'))
  steps = [src[i] for i in range(len(src))]
  assert [s['step_type'] for s in steps] == ['problem', 'code', 'answer', 'problem', 'answer']
  dark = steps[:3]
  assert all(s['question'] == 'What is written on the sign?' for s in dark)
  assert all(s['answers'] == ['OPEN'] and s['degradations'] == ['dark'] for s in dark)
  assert dark[0]['context'] == '' and '<problem>' in dark[1]['context']
  assert dark[2]['solution'] == '<answer> OPEN </answer>' and dark[2]['split'] == 'train'
  # The answer step shows the clean (_ori) image, the earlier steps the degraded one.
  assert dark[0]['images'] == dark[1]['images'] != dark[2]['images']
  assert steps[4]['answers'] == ['blue'] and steps[4]['degradations'] == ['none']
  b = builders.prepare('mat_training/coding', manual_dir=mat_dir, data_dir=str(tmp_path / 'tfds'))
  assert builders.skip_report(b)['train']['reasons'] == {'bad type': 1}


def test_mat_training_search_infers_step_type_and_moves_chain_to_context(mat_dir, tmp_path):
  src = builders.load('mat_training/search', manual_dir=mat_dir, data_dir=str(tmp_path / 'tfds'))
  steps = [src[i] for i in range(len(src))]
  assert [s['step_type'] for s in steps] == ['search', 'answer']
  assert steps[0]['question'] == steps[1]['question'] == 'Who founded the brand?'
  assert steps[1]['context'].startswith('<think> a </think>') and '<information>' in steps[1]['context']
  assert steps[0]['answers'] == ['Ada'] and steps[0]['task'] == 'search'


def test_multihop_reads_every_split_present(flashrag_dir, tmp_path):
  data_dir = str(tmp_path / 'tfds')
  with pytest.raises(ValueError, match='choose one'):
    builders.load('multihop_qa/hotpotqa', manual_dir=flashrag_dir, data_dir=data_dir)
  dev = builders.load('multihop_qa/hotpotqa', 'dev', manual_dir=flashrag_dir, data_dir=data_dir)
  assert [dev[i]['id'] for i in range(len(dev))] == ['dev_0', 'dev_1']
  assert dev[1]['answers'] == ['Ada', 'Ada L.'] and dev[1]['images'] == []
  assert dev[0]['task'] == 'multihop' and dev[0]['split'] == 'dev'
  test = builders.load('multihop_qa/hotpotqa', 'test', manual_dir=flashrag_dir, data_dir=data_dir)
  assert test[0]['id'] == 'test_0' and test[0]['answers'] == ['single']
  b = builders.prepare('multihop_qa/hotpotqa', manual_dir=flashrag_dir, data_dir=data_dir)
  assert builders.skip_report(b)['dev']['reasons'] == {'bad json line': 1, 'bad question': 1}


@pytest.mark.parametrize('name, expected', [
    ('mat_benchmark/coding', ['MAT-Benchmark/MAT-Coding.json', 'MAT-Benchmark/MAT-Coding-image/']),
    ('mat_training/search', ['MAT-Training/rft_agent_search_20.json', 'MAT-Training/rft_agent_search_20_images/']),
    ('multihop_qa/musique', ['musique/dev.jsonl', 'musique/test.jsonl']),
])
def test_missing_manual_dir_names_the_files(tmp_path, name, expected):
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(FileNotFoundError) as info:
    builders.load(name, manual_dir=str(empty))
  message = str(info.value)
  for path in expected:
    assert os.path.join(str(empty), path) in message
  assert 'MISSING' in message and 'varft.data.demo' in message


def test_unknown_names_are_rejected(tmp_path):
  with pytest.raises(ValueError, match='mat_benchmark/search'):
    builders.builder('mat_bench/search', data_dir=str(tmp_path))
  with pytest.raises(ValueError, match='unknown config'):
    builders.builder('multihop_qa/nq', data_dir=str(tmp_path))


def test_concurrent_prepare_accepts_the_winners_dataset(mat_dir, tmp_path, monkeypatch):
  """A host whose final rename fails because another host prepared the same data_dir goes on."""
  data_dir = str(tmp_path / 'shared')
  real_builder = builders.builder

  def racing_builder(name, *, data_dir):
    b = real_builder(name, data_dir=data_dir)
    if not b.is_prepared():

      def lose_the_race(**kwargs):
        real_builder(name, data_dir=data_dir).download_and_prepare(**kwargs)  # the other host
        raise OSError('rename: directory not empty')

      b.download_and_prepare = lose_the_race
    return b

  monkeypatch.setattr(builders, 'builder', racing_builder)
  b = builders.prepare('mat_benchmark/coding', manual_dir=mat_dir, data_dir=data_dir)
  assert b.is_prepared() and b.info.splits['test'].num_examples == 4


def test_prepare_reraises_real_errors(mat_dir, tmp_path, monkeypatch):
  real_builder = builders.builder

  def failing_builder(name, *, data_dir):
    b = real_builder(name, data_dir=data_dir)

    def fail(**kwargs):
      raise OSError('disk full')

    b.download_and_prepare = fail
    return b

  monkeypatch.setattr(builders, 'builder', failing_builder)
  with pytest.raises(OSError, match='disk full'):
    builders.prepare('mat_benchmark/coding', manual_dir=mat_dir, data_dir=str(tmp_path / 'd'))


def test_cli_prepares_and_reports(flashrag_dir, tmp_path, capsys):
  builders.main(['multihop_qa/hotpotqa', '--manual_dir', flashrag_dir, '--data_dir', str(tmp_path)])
  out = capsys.readouterr().out
  assert "multihop_qa/hotpotqa: {'dev': 2, 'test': 1}" in out and "'bad json line': 1" in out
  with pytest.raises(SystemExit, match='error: multihop_qa/musique: the manual dir'):
    builders.main(['multihop_qa/musique', '--manual_dir', flashrag_dir, '--data_dir', str(tmp_path)])


def test_cli_prepared_data_is_what_the_trainer_loads_without_regenerating(mat_dir, tmp_path):
  """`python -m varft.data.builders ... --data_dir X` then `config.data.tfds_dir=X`: one folder, built once."""
  import shutil
  import subprocess
  import sys

  from varft import agent_task
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  data_dir = tmp_path / 'prepared'
  out = subprocess.run([
      sys.executable, '-m', 'varft.data.builders', 'mat_training/search', '--manual_dir', mat_dir, '--data_dir',
      str(data_dir)
  ], cwd=repo, env=dict(os.environ, PYTHONPATH=repo), capture_output=True, text=True, timeout=300, check=True)
  folder = data_dir / 'mat_training' / 'search' / str(builders.MatTraining.VERSION)
  assert f'at {folder}' in out.stdout
  assert builders.dataset_dir('mat_training/search', data_dir=str(data_dir)) == str(folder)
  shutil.rmtree(mat_dir)  # regenerating would now fail: the trainer must read the prepared folder
  source = agent_task.load_source('mat_training/search', None, mat_dir, str(data_dir))  # what AgentEnvironment calls
  assert len(source) == 2 and source[1]['step_type'] == 'answer'


def test_mat_json_with_a_bom_and_bad_utf8_skips_that_record_naming_file_and_line(mat_dir, tmp_path):
  path = os.path.join(mat_dir, 'MAT-Benchmark', 'MAT-Search.json')
  with open(path, encoding='utf-8') as f:
    rows = json.load(f)
  text = json.dumps(rows, indent=1, ensure_ascii=False).replace('Question 2?', 'Question \udcff?')
  with open(path, 'wb') as f:
    f.write(b'\xef\xbb\xbf' + text.encode('utf-8', 'surrogateescape'))
  b = builders.prepare('mat_benchmark/search', manual_dir=mat_dir, data_dir=str(tmp_path / 'tfds'))
  src = builders.load('mat_benchmark/search', manual_dir=mat_dir, data_dir=str(tmp_path / 'tfds'))
  assert [src[i]['id'] for i in range(len(src))] == ['1', '2', '4', '5', '6']  # the BOM kept the first record
  report = builders.skip_report(b)['test']
  assert report['reasons'] == {'invalid utf-8': 1, 'missing image': 1, 'bad question': 1}
  assert report['first'][0].startswith('MAT-Search.json:14 (item 2): invalid utf-8: question holds text')


def test_cli_reports_too_deep_mat_json_in_one_line(mat_dir, tmp_path):
  path = os.path.join(mat_dir, 'MAT-Benchmark', 'MAT-Coding.json')
  with open(path, 'w') as f:
    f.write('[' + '[' * 5000 + ']' * 5000 + ']')
  with pytest.raises(SystemExit) as info:
    builders.main(['mat_benchmark/coding', '--manual_dir', mat_dir, '--data_dir', str(tmp_path)])
  assert str(info.value) == f'error: {path}:1: item 0 is nested too deeply to parse; fix or remove it.'


def test_builders_skip_what_the_rollout_would_reject_sizes_and_duplicate_ids(mat_dir, flashrag_dir, tmp_path):
  images = os.path.join(mat_dir, 'MAT-Benchmark', 'MAT-Search-image')
  Image.new('RGB', (60000, 10), (5, 5, 5)).save(os.path.join(images, 'strip.png'))
  path = os.path.join(mat_dir, 'MAT-Benchmark', 'MAT-Search.json')
  with open(path, encoding='utf-8') as f:
    rows = json.load(f)
  rows += [{
      'id': 20,
      'question': 'Strip?',
      'answer': 'x',
      'image_path': 'strip.png'
  }, {
      'id': 2,
      'question': 'Same id as item 1?',
      'answer': 'y',
      'image_path': 'annotation2.jpg'
  }]
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(rows, f)
  src = builders.load('mat_benchmark/search', manual_dir=mat_dir, data_dir=str(tmp_path / 'tfds'))
  assert [src[i]['id'] for i in range(len(src))] == ['1', '2', '3', '4', '5', '6']
  assert src[1]['question'] == 'Question 1?'  # the first of an id is kept
  report = builders.skip_report(
      builders.prepare('mat_benchmark/search', manual_dir=mat_dir, data_dir=str(tmp_path / 'tfds')))['test']
  assert report['reasons'] == {'missing image': 1, 'bad question': 1, 'bad image size': 1, 'duplicate id': 1}
  assert any('aspect ratio 6000.0 > 200' in m for m in report['first'])
  assert "MAT-Search.json:1 (item 9): duplicate id: id '2' is already used at MAT-Search.json:1 (item 1)" in (
      report['first'])

  dev = os.path.join(flashrag_dir, 'hotpotqa', 'dev.jsonl')
  with open(dev, 'a') as f:
    f.write(json.dumps({'id': 'dev_0', 'question': 'Again?', 'golden_answers': ['no']}) + '\n')
  b = builders.prepare('multihop_qa/hotpotqa', manual_dir=flashrag_dir, data_dir=str(tmp_path / 'mh'))
  assert builders.skip_report(b)['dev']['reasons'] == {'bad json line': 1, 'bad question': 1, 'duplicate id': 1}
