"""Fixtures: manual dirs in the published layouts, built from tests/fixtures/data + generated files."""
import json
import os
import shutil

from PIL import Image
import pytest
import tensorflow_datasets as tfds

FIXTURES = os.path.join(os.path.dirname(__file__), '..', 'fixtures', 'data')
tfds.display_progress_bar(False)


def write_png(path, color=(200, 30, 30), size=(32, 24)):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new('RGB', size, color).save(path)


def write_json(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(obj, f, ensure_ascii=False)


@pytest.fixture
def mat_dir(tmp_path):
  """A MAT manual dir: real MAT-Coding cases + generated MAT-Search and MAT-Training files, with
  one corrupt image, one missing image and one malformed record per file."""
  root = tmp_path / 'MAT'
  coding_images = root / 'MAT-Benchmark' / 'MAT-Coding-image'
  coding_images.mkdir(parents=True)
  for name in ('none_2_proc.png', 'crop_8_ori.png', 'rotation180_1_proc.png', 'dark_1_proc.png'):
    shutil.copy(os.path.join(FIXTURES, name), coding_images / name)
  with open(os.path.join(FIXTURES, 'mat_coding_cases.json'), encoding='utf-8') as f:
    coding = json.load(f)
  (coding_images / 'broken_proc.png').write_bytes(b'\x89PNG\r\n\x1a\n not really a png')
  coding += [
      {
          'id': 900,
          'question': 'q?',
          'answers': ['a'],
          'ori_image_path': 'broken_ori.png',
          'processed_image_path': 'broken_proc.png',
          'type': ['blur'],
          'split': 'hard'
      },
      {
          'id': 901,
          'question': 'q?',
          'answers': ['a'],
          'ori_image_path': 'x_ori.png',
          'processed_image_path': 'none_2_proc.png',
          'type': ['sepia'],
          'split': 'hard'
      },
  ]
  write_json(root / 'MAT-Benchmark' / 'MAT-Coding.json', coding)

  search_images = root / 'MAT-Benchmark' / 'MAT-Search-image'
  search_images.mkdir(parents=True)
  shutil.copy(os.path.join(FIXTURES, 'annotation2.jpg'), search_images / 'annotation2.jpg')
  search = [{
      'id': i + 1,
      'question': f'Question {i}?',
      'answer': f'Answer {i}',
      'image_path': 'annotation2.jpg'
  } for i in range(6)]
  search.append({'id': 7, 'question': 'Missing image?', 'answer': 'x', 'image_path': 'nope.jpg'})
  search.append({'id': 8, 'answer': 'no question', 'image_path': 'annotation2.jpg'})
  write_json(root / 'MAT-Benchmark' / 'MAT-Search.json', search)

  code_images = root / 'MAT-Training' / 'rft_agent_code_1_2k_images'
  write_png(str(code_images / 'dark_3_proc.png'), (10, 10, 10))
  write_png(str(code_images / 'dark_3_ori.png'), (200, 200, 200))
  write_png(str(code_images / 'none_4_proc.png'), (90, 90, 200))
  query = '<query> What is written on the sign? </query>'
  problem_gt = "<think> Too dark. </think>\n<problem> {'dark'} </problem>"
  code_gt = "<think> Brighten. </think>\n<code>\n```python\nimport cv2\n```\n</code>"
  code_rows = [
      {
          'type': 'pre_problem',
          'image_path': 'dark_3_proc.png',
          'problem': query,
          'solution': "<problem> {'dark'} </problem>",
          'gt': problem_gt
      },
      {
          'type': 'pre_code',
          'image_path': 'dark_3_proc.png',
          'problem': query,
          'context': problem_gt,
          'solution': "<code>\n```python\nimport cv2\n```\n</code>",
          'gt': code_gt
      },
      {
          'type': 'pre_answer',
          'image_path': 'dark_3_ori.png',
          'problem': query,
          'context': problem_gt + '\n' + code_gt,
          'solution': '<answer> OPEN </answer>',
          'gt': '<think> It reads OPEN. </think>\n<answer> OPEN </answer>'
      },
      {
          'type': 'pre_problem',
          'image_path': 'none_4_proc.png',
          'problem': '<query> Which colour? </query>',
          'solution': "<problem> {'none'} </problem>"
      },
      # Malformed: declared code step whose solution is an answer.
      {
          'type': 'pre_code',
          'image_path': 'none_4_proc.png',
          'problem': '<query> Which colour? </query>',
          'context': '',
          'solution': '<answer> blue </answer>'
      },
      {
          'type': 'pre_answer',
          'image_path': 'none_4_proc.png',
          'problem': '<query> Which colour? </query>',
          'context': "<problem> {'none'} </problem>",
          'solution': '<answer> blue </answer>'
      },
  ]
  write_json(root / 'MAT-Training' / 'rft_agent_code_1_2k.json', code_rows)

  search_train_images = root / 'MAT-Training' / 'rft_agent_search_20_images'
  write_png(str(search_train_images / 'logo_1.png'))
  search_rows = [
      {
          'type': 'pre_problem',
          'image_path': 'logo_1.png',
          'problem': '<query> Who founded the brand? </query>',
          'solution': '<search> brand founder </search>'
      },  # the tag decides, not `type`
      {
          'image_path': 'logo_1.png',
          'problem': '<query> Who founded the brand? </query>\n<think> a </think>\n<search> brand '
                     'founder </search>\n<information> 1. Content: Ada founded it. </information>',
          'solution': '<answer> Ada </answer>'
      },
      {
          'image_path': 'logo_1.png',
          'problem': '<query> Who? </query>',
          'solution': 'no tags'
      },
  ]
  write_json(root / 'MAT-Training' / 'rft_agent_search_20.json', search_rows)
  return str(root)


@pytest.fixture
def flashrag_dir(tmp_path):
  """A FlashRAG manual dir with hotpotqa dev + test (one unparsable line, one bad record)."""
  root = tmp_path / 'FlashRAG_datasets'
  (root / 'hotpotqa').mkdir(parents=True)
  dev = [{
      'id': 'dev_0',
      'question': 'Were Scott Derrickson and Ed Wood of the same nationality?',
      'golden_answers': ['yes'],
      'metadata': {}
  }, {
      'id': 'dev_1',
      'question': 'Who is older?',
      'golden_answers': ['Ada', 'Ada L.']
  }]
  lines = [json.dumps(r) for r in dev] + ['{not json', json.dumps({'id': 'dev_3'}), '']
  (root / 'hotpotqa' / 'dev.jsonl').write_text('\n'.join(lines) + '\n')
  (root / 'hotpotqa' /
   'test.jsonl').write_text(json.dumps({
       'question': 'No id here?',
       'golden_answers': 'single'
   }) + '\n')
  return str(root)
