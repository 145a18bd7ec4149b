"""TFDS builders for the published datasets (array_record files, read back without TensorFlow).

Each builder reads files the user downloaded into a *manual dir* and writes `array_record`
shards in the uniform example schema (see `varft.data.records`). Reading goes through
`builder.as_data_source(split)` (what `tfds.data_source` calls): random access, no TensorFlow.

  name                        manual dir holds                                      splits
  mat_benchmark/search        MAT-Benchmark/MAT-Search.json + MAT-Search-image/     test
  mat_benchmark/coding        MAT-Benchmark/MAT-Coding.json + MAT-Coding-image/     test
  mat_training/search         MAT-Training/rft_agent_search_20.json + images        train
  mat_training/coding         MAT-Training/rft_agent_code_1_2k.json + images        train
  multihop_qa/<dataset>       <dataset>/{train,dev,test}.jsonl (FlashRAG layout)    those present

The MAT manual dir is the root of the `laolao77/MAT` dataset download; the multi-hop manual dir is
the root of the FlashRAG datasets download (2wikimultihopqa, hotpotqa, musique, bamboogle).
`python -m varft.data.demo --out DIR` writes the same layouts under DIR/MAT and
DIR/FlashRAG_datasets (config `multihop_qa/demo`).

Skipped records (malformed JSON or text that is not UTF-8, missing or corrupt images, images the
processor would reject for their size, duplicate ids) are counted per reason, logged, and stored
in the prepared dataset's metadata (`skip_report(prepare(name, ...))` reads them back).
"""
from __future__ import annotations

from collections.abc import Sequence
import contextlib
import dataclasses
import inspect
import io
import logging
import os

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from varft.data import json_files, records

_MAT_URL = 'https://huggingface.co/datasets/laolao77/MAT'
_FLASHRAG_URL = 'https://huggingface.co/datasets/RUC-NLPIR/FlashRAG_datasets'
MULTIHOP_DATASETS = ('2wikimultihopqa', 'hotpotqa', 'musique', 'bamboogle', 'demo')
MULTIHOP_SPLITS = ('train', 'dev', 'test')
# Where MAT-Training images live differs between mirrors of the download; the first that exists
# wins (relative to MAT-Training/).
_TRAINING_IMAGE_DIRS = ('{stem}_images', 'images')


def _text():
  return tfds.features.Text()


def _features(step_wise: bool) -> tfds.features.FeaturesDict:
  features = {
      'id': _text(),
      'task': _text(),
      'question': _text(),
      'answers': tfds.features.Sequence(_text()),
      # Encoded PNG/JPEG bytes, kept as they are: the processor decodes and resizes on the host.
      'images': tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
      'degradations': tfds.features.Sequence(_text()),
      'split': _text(),
  }
  if step_wise:
    features.update(step_type=_text(), context=_text(), solution=_text(), gt=_text())
  return tfds.features.FeaturesDict(features)


@dataclasses.dataclass
class _Layout:
  """Files a config needs, relative to the manual dir, and what to tell the user if absent."""
  files: Sequence[str]
  dirs: Sequence[str]
  source: str
  need: str = 'these exist'


def missing_files_message(builder_name: str, manual_dir: str, layout: _Layout) -> str:
  """The exact files and folders a config needs, as a user-facing message."""
  manual_dir = os.fspath(manual_dir)
  lines = [
      f'{builder_name}: the manual dir {manual_dir!r} is missing required data.',
      f'Download {layout.source} and arrange it so that {layout.need}:'
  ]
  for f in layout.files:
    mark = 'ok  ' if os.path.isfile(os.path.join(manual_dir, f)) else 'MISSING'
    lines.append(f'  [{mark}] {os.path.join(manual_dir, f)}  (file)')
  for d in layout.dirs:
    mark = 'ok  ' if os.path.isdir(os.path.join(manual_dir, d)) else 'MISSING'
    lines.append(f'  [{mark}] {os.path.join(manual_dir, d)}/  (folder of images)')
  lines.append('Or run `python -m varft.data.demo --out DIR` and use DIR/MAT (and '
               'DIR/FlashRAG_datasets) to try everything on the embedded demo data.')
  return '\n'.join(lines)


def _check_layout(builder_name: str, manual_dir: str | None, layout: _Layout) -> str:
  if manual_dir is None:
    raise FileNotFoundError(f'{builder_name} needs a manual dir (manual_dir=...).\n' +
                            missing_files_message(builder_name, '<manual_dir>', layout))
  manual_dir = os.fspath(manual_dir)
  ok = (all(os.path.isfile(os.path.join(manual_dir, f)) for f in layout.files) and
        all(os.path.isdir(os.path.join(manual_dir, d)) for d in layout.dirs))
  if not ok:
    raise FileNotFoundError(missing_files_message(builder_name, manual_dir, layout))
  return manual_dir


def _finish(builder: tfds.core.GeneratorBasedBuilder, split: str, report: records.SkipReport) -> None:
  builder.info.metadata.setdefault('skipped', {})[split] = report.as_dict()
  if report.total:
    logging.warning('%s', report.summary())
  else:
    logging.info('%s', report.summary())


class _Builder(tfds.core.GeneratorBasedBuilder):
  """Shared info: uniform features, published order kept, skip counts in the metadata."""
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  STEP_WISE = False

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds' default probes the `importlib_resources` backport, absent on Python >= 3.9.
    return epath.Path(inspect.getfile(cls))

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(self.__class__.__doc__ or '').strip(),
        features=_features(self.STEP_WISE),
        # Benchmarks are scored in published order (first items simple, last hard); training
        # order is shuffled by the grain pipeline, not by the writer.
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(),
    )


@dataclasses.dataclass
class MatBenchmarkConfig(tfds.core.BuilderConfig):
  json_file: str = ''
  image_dir: str = ''


class MatBenchmark(_Builder):
  """MAT benchmark (Visual-ARFT): MAT-Search (150 items) and MAT-Coding (200 items)."""
  BUILDER_CONFIGS = [
      MatBenchmarkConfig(name='search', description='MAT-Search: multi-hop visual search QA.',
                         json_file='MAT-Benchmark/MAT-Search.json', image_dir='MAT-Benchmark/MAT-Search-image'),
      MatBenchmarkConfig(name='coding', description='MAT-Coding: degraded-image QA.',
                         json_file='MAT-Benchmark/MAT-Coding.json', image_dir='MAT-Benchmark/MAT-Coding-image'),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f'Download the MAT dataset ({_MAT_URL}) and pass its root as the manual dir; it must hold '
      'MAT-Benchmark/MAT-Search.json, MAT-Benchmark/MAT-Search-image/, '
      'MAT-Benchmark/MAT-Coding.json and MAT-Benchmark/MAT-Coding-image/.')

  def _layout(self) -> _Layout:
    c = self.builder_config
    return _Layout(files=[c.json_file], dirs=[c.image_dir], source=f'MAT ({_MAT_URL})')

  def _split_generators(self, dl_manager):
    manual_dir = _check_layout(self.name + '/' + self.builder_config.name, dl_manager._manual_dir, self._layout())  # pylint: disable=protected-access
    return {'test': self._generate_examples(manual_dir)}

  def _generate_examples(self, manual_dir):
    c = self.builder_config
    json_path = os.path.join(manual_dir, c.json_file)
    image_dir = os.path.join(manual_dir, c.image_dir)
    rows = json_files.read_json_list(json_path)
    report = records.SkipReport(f'{self.name}/{c.name} ({json_path})')
    ids = records.UniqueIds()
    for position, record in enumerate(rows.records):
      try:
        if c.name == 'search':
          example = records.mat_search_example(record, position, len(rows.records), image_dir)
        else:
          example = records.mat_coding_example(record, position, image_dir)
        ids.claim(example['id'], rows.where(position))
      except records.MalformedRecord as e:
        report.skip(rows.where(position), e)
        continue
      yield position, example
    _finish(self, 'test', report)


@dataclasses.dataclass
class MatTrainingConfig(tfds.core.BuilderConfig):
  json_file: str = ''
  task: str = ''


class MatTraining(_Builder):
  """MAT-Training (Visual-ARFT): step-wise GRPO samples for agentic search and coding."""
  STEP_WISE = True
  # 1.1.0: a folder prepared before `gt` was kept is prepared again (tfds would read it back as 'None').
  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {
      '1.0.0': 'Initial release.',
      '1.1.0': "gt: the record's reference step with its <think> (for gold injection)."
  }
  BUILDER_CONFIGS = [
      MatTrainingConfig(name='search', description='63 step samples from 20 search trajectories.',
                        json_file='MAT-Training/rft_agent_search_20.json', task='search'),
      MatTrainingConfig(name='coding', description='~3.4k step samples from 1.2k coding items.',
                        json_file='MAT-Training/rft_agent_code_1_2k.json', task='coding'),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f'Download the MAT dataset ({_MAT_URL}) and pass its root as the manual dir; it must hold '
      'MAT-Training/rft_agent_search_20.json with its images in '
      'MAT-Training/rft_agent_search_20_images/, and MAT-Training/rft_agent_code_1_2k.json with '
      'its images in MAT-Training/rft_agent_code_1_2k_images/ (MAT-Training/images/ also works).')

  def _image_dir(self, manual_dir: str) -> str | None:
    stem = os.path.splitext(os.path.basename(self.builder_config.json_file))[0]
    for pattern in _TRAINING_IMAGE_DIRS:
      path = os.path.join(manual_dir, 'MAT-Training', pattern.format(stem=stem))
      if os.path.isdir(path):
        return path
    return None

  def _split_generators(self, dl_manager):
    c = self.builder_config
    stem = os.path.splitext(os.path.basename(c.json_file))[0]
    manual_dir = dl_manager._manual_dir  # pylint: disable=protected-access
    image_dir = self._image_dir(manual_dir) if manual_dir else None
    if image_dir is None or not os.path.isfile(os.path.join(manual_dir, c.json_file)):
      layout = _Layout(files=[c.json_file], dirs=[f'MAT-Training/{stem}_images'], source=f'MAT ({_MAT_URL})')
      _check_layout(f'{self.name}/{c.name}', manual_dir, layout)  # Raises, naming what is missing.
    return {'train': self._generate_examples(os.path.join(manual_dir, c.json_file), image_dir)}

  def _generate_examples(self, json_path, image_dir):
    c = self.builder_config
    report = records.SkipReport(f'{self.name}/{c.name} ({json_path})')
    rows = json_files.read_json_list(json_path)
    yield from records.mat_training_examples(rows.records, image_dir, c.task, report, where=rows.where)
    _finish(self, 'train', report)


class MultihopQa(_Builder):
  """FlashRAG multi-hop QA (text only): 2WikiMultihopQA, HotpotQA, MuSiQue, Bamboogle."""
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=n, description=f'FlashRAG {n}.') for n in MULTIHOP_DATASETS]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f'Download the FlashRAG datasets ({_FLASHRAG_URL}) and pass their root as the manual dir; '
      'it must hold <dataset>/<split>.jsonl, e.g. hotpotqa/dev.jsonl, 2wikimultihopqa/dev.jsonl, '
      'musique/dev.jsonl, bamboogle/test.jsonl.')

  def _split_generators(self, dl_manager):
    name = self.builder_config.name
    manual_dir = dl_manager._manual_dir  # pylint: disable=protected-access
    present = [
        s for s in MULTIHOP_SPLITS if manual_dir and os.path.isfile(os.path.join(manual_dir, name, f'{s}.jsonl'))
    ]
    if not present:
      layout = _Layout(files=[f'{name}/{s}.jsonl' for s in MULTIHOP_SPLITS], dirs=[],
                       source=f'the FlashRAG datasets ({_FLASHRAG_URL})', need='at least one of these exists')
      raise FileNotFoundError(missing_files_message(f'{self.name}/{name}', manual_dir or '<manual_dir>', layout))
    return {s: self._generate_examples(os.path.join(manual_dir, name, f'{s}.jsonl'), s) for s in present}

  def _generate_examples(self, path, split):
    report = records.SkipReport(f'{self.name}/{self.builder_config.name} ({path})')
    ids = records.UniqueIds()
    for line_no, record in json_files.iter_jsonl(path, report):
      where = f'{os.path.basename(path)}:{line_no}'
      try:
        example = records.multihop_example(record, line_no, split)
        ids.claim(example['id'], where)
      except records.MalformedRecord as e:
        report.skip(where, e)
        continue
      yield line_no, example
    _finish(self, split, report)


BUILDERS = {'mat_benchmark': MatBenchmark, 'mat_training': MatTraining, 'multihop_qa': MultihopQa}


def builder(name: str, *, data_dir: str) -> tfds.core.GeneratorBasedBuilder:
  """`'mat_benchmark/coding'` -> the builder instance writing to / reading from `data_dir`."""
  family, _, config = name.partition('/')
  if family not in BUILDERS or not config:
    raise ValueError(f'unknown dataset {name!r}; expected one of ' +
                     ', '.join(f'{f}/{c.name}' for f, b in BUILDERS.items() for c in b.BUILDER_CONFIGS))
  configs = [c.name for c in BUILDERS[family].BUILDER_CONFIGS]
  if config not in configs:
    raise ValueError(f'unknown config {config!r} for {family}; expected one of {configs}')
  return BUILDERS[family](config=config, data_dir=os.fspath(data_dir), file_format='array_record')


def dataset_dir(name: str, *, data_dir: str) -> str:
  """The folder `name` is prepared in: `<data_dir>/<family>/<config>/<version>` (TFDS's layout).

  This is the one naming rule: the CLI (`--data_dir`), the trainer (`config.data.tfds_dir`) and
  `load` / `prepare` all pass the same `data_dir` root, so each finds what the others prepared.
  """
  return os.fspath(builder(name, data_dir=data_dir).data_dir)


def prepare(
    name: str,
    *,
    manual_dir: str | None,
    data_dir: str | None = None,
) -> tfds.core.GeneratorBasedBuilder:
  """Builds `name` from `manual_dir` unless already prepared; returns the builder.

  `data_dir` is the root of every prepared dataset (see `dataset_dir`); it defaults to
  `<manual_dir>/tfds`, so the demo and the real data never share prepared files. A prepared
  dataset is reused as it is (`manual_dir` is then not read): delete its folder to rebuild. Hosts of
  one run may prepare into a shared `data_dir` at once; preparing first on one host (e.g.
  `python -m varft.data.builders NAME --manual_dir DIR --data_dir DIR2`) avoids the duplicate work.
  """
  if data_dir is None:
    if manual_dir is None:
      raise ValueError(f'{name}: give manual_dir (the downloaded files) or data_dir.')
    data_dir = os.path.join(manual_dir, 'tfds')
  b = builder(name, data_dir=data_dir)
  if not b.is_prepared():
    logging.info('Preparing %s from %s into %s', name, manual_dir, b.data_dir)
    try:
      # Local files only: TFDS's "Downloading and preparing" banner (printed, with escape codes) and its
      # progress bars say nothing here.
      tfds.display_progress_bar(False)
      with contextlib.redirect_stdout(io.StringIO()):
        b.download_and_prepare(download_config=tfds.download.DownloadConfig(
            manual_dir=os.fspath(manual_dir) if manual_dir else None, try_download_gcs=False))
    except OSError:
      # Several processes (hosts of one run) preparing into a shared data_dir: the ones that lose
      # the final rename find the dataset prepared by the winner.
      b = builder(name, data_dir=data_dir)
      if not b.is_prepared():
        raise
  return b


def skip_report(b: tfds.core.GeneratorBasedBuilder) -> dict:
  """{split: {'total', 'reasons', 'first'}} recorded when `b` was prepared."""
  return dict(b.info.metadata.get('skipped', {}))


class Source:
  """Random-access view of one prepared split in the uniform schema (text as `str`).

  A grain `RandomAccessDataSource`: `len(src)`, `src[i]` -> example dict.
  """

  def __init__(self, data_source, name: str, split: str):
    self._source = data_source
    self.name = name
    self.split = split

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    return records.decode(self._source[index])

  def __repr__(self) -> str:
    return f'Source({self.name}, split={self.split!r}, n={len(self)})'


def load(name: str, split: str | None = None, *, manual_dir: str | None = None, data_dir: str | None = None) -> Source:
  """Prepares `name` if needed and returns a random-access source of decoded examples.

  `split` defaults to the only split a dataset has ('test' for benchmarks, 'train' for
  MAT-Training; multi-hop sets need it when the download has several).
  """
  b = prepare(name, manual_dir=manual_dir, data_dir=data_dir)
  splits = sorted(b.info.splits.keys())
  if split is None:
    if len(splits) != 1:
      raise ValueError(f'{name} has splits {splits}; choose one with split=...')
    split = splits[0]
  if split not in splits:
    raise ValueError(f'{name} has no split {split!r}; it has {splits}')
  return Source(b.as_data_source(split=split), name, split)


def main(argv=None) -> None:
  """`python -m varft.data.builders NAME --manual_dir DIR [--data_dir DIR]`: prepare and report."""
  import argparse
  parser = argparse.ArgumentParser(description=main.__doc__)
  parser.add_argument('names', nargs='+', help='e.g. mat_benchmark/coding multihop_qa/hotpotqa')
  parser.add_argument('--manual_dir', required=True)
  parser.add_argument('--data_dir', default=None)
  args = parser.parse_args(argv)
  for name in args.names:
    try:
      b = prepare(name, manual_dir=args.manual_dir, data_dir=args.data_dir)
    except (FileNotFoundError, ValueError) as e:
      raise SystemExit(f'error: {e}') from e
    sizes = {s: info.num_examples for s, info in b.info.splits.items()}
    print(f'{name}: {sizes} at {b.data_dir}; skipped: {skip_report(b)}')


if __name__ == '__main__':
  main()
