"""The embedded demo: small, deterministic, offline data in the published MAT / FlashRAG layouts.

`python -m varft.data.demo --out DIR` writes, in about a second:

  DIR/MAT/MAT-Benchmark/MAT-Coding.json + MAT-Coding-image/   degraded-image QA (every type)
  DIR/MAT/MAT-Benchmark/MAT-Search.json + MAT-Search-image/   logo images, 1- and 2-hop questions
  DIR/MAT/MAT-Training/rft_agent_code_1_2k.json + _images/    step-wise coding samples
  DIR/MAT/MAT-Training/rft_agent_search_20.json + _images/    step-wise search samples
  DIR/FlashRAG_datasets/demo/test.jsonl                       text-only multi-hop QA
  DIR/corpus.jsonl                                            knowledge corpus {id, title, text}

so the same builders (`varft.data.builders`) read the demo and the real data:
`load('mat_benchmark/coding', manual_dir=DIR/MAT)`, `load('multihop_qa/demo',
manual_dir=DIR/FlashRAG_datasets)`; the BM25 search backend indexes DIR/corpus.jsonl.

Coding items render a short code word (or a grid of words for `crop`) and degrade the image
with one or two MAT-Coding types; reading the answer needs the restored image. Search items show
the logo of a generated company; the corpus knows its founder, founding year and headquarters,
and the cities' rivers, so questions need one search (year) or two (river of the headquarters
city, birthplace of the founder). Everything derives from `seed` through numpy's PCG64.
The images and the reference fix programs are drawn by `varft.data.demo_images`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil

import numpy as np

from varft import prompts
from varft.data import demo_images

SINGLE_TYPES = ('rotation90', 'rotation180', 'dark', 'overexposure', 'blur', 'noise', 'crop', 'none')
# Hard MAT-Coding items combine a rotation with a photometric degradation.
COMBINED_TYPES = (('rotation90', 'dark'), ('rotation180', 'blur'), ('rotation90', 'noise'), ('rotation180',
                                                                                             'overexposure'))
CROP_QUESTION = ('Recognize the text within the [{x1}, {y1}, {x2}, {y2}] of the image. The '
                 'coordinates have been normalized ranging from 0 to 1000 by the image width and '
                 'height. ')
_SYLLABLES = ('ka', 'lo', 'mi', 'ren', 'tas', 'vo', 'zer', 'qui', 'dan', 'bel', 'sor', 'nix', 'pra', 'tul', 'ves',
              'gor', 'lin', 'mar', 'o', 'e')
_RIVERS = ('Amsel', 'Brenna', 'Corvin', 'Dalla', 'Esker', 'Fennel', 'Gala', 'Hollin', 'Isar', 'Jorvik', 'Kessel',
           'Lumen')
_PRODUCTS = ('bicycles', 'teapots', 'umbrellas', 'telescopes', 'violins', 'lanterns', 'kites', 'clocks', 'skates',
             'compasses', 'pianos', 'canoes')
_COLORS = ((200, 40, 40), (30, 110, 200), (40, 150, 60), (230, 160, 20), (120, 50, 170), (20, 150, 150), (210, 80, 140),
           (90, 90, 90))


@dataclasses.dataclass(frozen=True)
class Sizes:
  """How many items each file gets; the defaults keep the demo run within minutes on 2 CPUs."""
  coding_benchmark: int = 16
  coding_training: int = 12
  search_benchmark: int = 12
  search_training: int = 8
  multihop: int = 12
  companies: int = 12


def layout(out_dir: str) -> dict:
  """Paths a config needs for the demo written to `out_dir`."""
  return {
      'root': out_dir,
      'mat_dir': os.path.join(out_dir, 'MAT'),
      'flashrag_dir': os.path.join(out_dir, 'FlashRAG_datasets'),
      'multihop_dataset': 'demo',
      'corpus': os.path.join(out_dir, 'corpus.jsonl'),
  }


# ---------------------------------------------------------------------------------------------
# The generated world: companies, founders, cities, rivers.


def _name(rng: np.random.Generator, parts: int) -> str:
  return ''.join(rng.choice(_SYLLABLES, size=parts)).capitalize()


def _unique_names(rng: np.random.Generator, n: int, parts: int, taken: set) -> list[str]:
  names = []
  while len(names) < n:
    name = _name(rng, parts)
    if name not in taken and len(name) >= 4:
      taken.add(name)
      names.append(name)
  return names


def world(seed: int = 0, companies: int = 12) -> list[dict]:
  """Generated companies with founder, year, headquarters city (and its river), birthplace."""
  rng = np.random.default_rng(seed)
  taken: set = set()
  n_cities = max(4, companies // 2)
  cities = _unique_names(rng, n_cities, 2, taken)
  rivers = dict(zip(cities, rng.permutation(_RIVERS)[:n_cities]))
  brands = _unique_names(rng, companies, 3, taken)
  firsts = _unique_names(rng, companies, 2, taken)
  lasts = _unique_names(rng, companies, 2, taken)
  out = []
  for i, brand in enumerate(brands):
    hq = cities[i % n_cities]
    # Born elsewhere than the headquarters, so the birthplace question stays two-hop.
    birthplace = cities[(i * 3 + 1) % n_cities]
    if birthplace == hq:
      birthplace = cities[(i + 1) % n_cities]
    out.append({
        'company': f'{brand} Works',
        'founder': f'{firsts[i]} {lasts[i]}',
        'year': str(int(rng.integers(1820, 1990))),
        'city': hq,
        'river': str(rivers[hq]),
        'birthplace': birthplace,
        'product': _PRODUCTS[i % len(_PRODUCTS)],
        'color': _COLORS[i % len(_COLORS)],
        'shape': ('circle', 'square', 'triangle')[i % 3],
    })
  return out


def corpus(entities: list[dict]) -> list[dict]:
  """Knowledge corpus rows {id, title, text}: one page per company, founder and city.

  No page holds both a company's name and a two-hop answer, so those need two searches.
  """
  rows, seen_cities = [], set()
  for e in entities:
    rows.append({
        'title': e['company'],
        'text': (f"{e['company']} is a maker of {e['product']} founded in {e['year']} by {e['founder']}. "
                 f"Its headquarters are in the city of {e['city']}.")
    })
    rows.append({
        'title': e['founder'],
        'text': (f"{e['founder']} is an engineer and entrepreneur who was born in {e['birthplace']}.")
    })
  for e in entities:
    for city in (e['city'], e['birthplace']):
      if city in seen_cities:
        continue
      seen_cities.add(city)
      river = next((x['river'] for x in entities if x['city'] == city), None)
      text = f'{city} is a city known for its markets and old bridges.'
      if river:
        text = f'{city} is a city that lies on the {river} river and is known for its bridges.'
      rows.append({'title': city, 'text': text})
  return [{'id': str(i), **row} for i, row in enumerate(rows)]


def questions(e: dict) -> list[tuple[str, str, list[str], int]]:
  """(question about the image, the same naming the company, answer, searches needed)."""
  return [
      ('In which year was the company whose logo is shown founded?', f"In which year was {e['company']} founded?",
       [e['year']], 1),
      ('Which river flows through the city where the company whose logo is shown has its '
       'headquarters?', f"Which river flows through the city where {e['company']} has its headquarters?", [e['river']],
       2),
      ('In which city was the founder of the company whose logo is shown born?',
       f"In which city was the founder of {e['company']} born?", [e['birthplace']], 2),
  ]


def reference_queries(e: dict, hops: int, question: str) -> list[str]:
  """The searches of the reference chain: the company page, then (two-hop) the next page."""
  if hops == 1:
    return [f"{e['company']} founded"]
  if 'river' in question:
    return [f"{e['company']} headquarters", f"{e['city']} river"]
  return [f"{e['company']} founder", f"{e['founder']} born"]


# ---------------------------------------------------------------------------------------------
# Items.


def _coding_item(k: int, kinds: tuple[str, ...], rng: np.random.Generator) -> dict:
  """One degraded-image question: clean image, degraded image, question, answer, reference fix."""
  if 'crop' in kinds:
    words = [demo_images.code_word(rng) for _ in range(9)]
    cell = int(rng.integers(0, 9))
    box = demo_images.grid_box(cell)
    clean = demo_images.grid_image(words)
    x1, y1, x2, y2 = box
    question = CROP_QUESTION.format(x1=x1, y1=y1, x2=x2, y2=y2)
    answer = words[cell]
    # The processed image of a crop item is the region the tool should cut out.
    processed = clean.crop(tuple(int(v * demo_images.IMAGE_SIZE / 1000) for v in box))
    return dict(clean=clean, processed=processed, question=question, answer=answer, kinds=list(kinds),
                code=demo_images.fix_code(list(kinds), box))
  answer = demo_images.code_word(rng)
  clean = demo_images.label_image(answer, rng)
  processed = clean
  for kind in kinds:
    processed = demo_images.degrade(processed, kind, rng)
  return dict(clean=clean, processed=processed, question='What code is printed on the label?', answer=answer,
              kinds=list(kinds), code=demo_images.fix_code(list(kinds)))


def _coding_kinds(k: int, n_simple: int) -> tuple[str, ...]:
  if k < n_simple:
    return (SINGLE_TYPES[k % len(SINGLE_TYPES)],)
  return COMBINED_TYPES[(k - n_simple) % len(COMBINED_TYPES)]


def _write_json(path: str, obj) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(obj, f, ensure_ascii=False, indent=1)


def _write_jsonl(path: str, rows) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + '\n')


def _coding_files(k: int, kinds: tuple[str, ...]) -> tuple[str, str]:
  stem = f"{'+'.join(kinds)}_{k}"
  return f'{stem}_ori.png', f'{stem}_proc.png'


def write_coding_benchmark(mat_dir: str, n: int, rng: np.random.Generator) -> list[dict]:
  """MAT-Coding.json: the first ~35% simple (one type each), the rest hard (combined types)."""
  image_dir = os.path.join(mat_dir, 'MAT-Benchmark', 'MAT-Coding-image')
  n_simple = max(len(SINGLE_TYPES), int(round(n * 0.35)))
  rows = []
  for k in range(n):
    kinds = _coding_kinds(k, n_simple)
    item = _coding_item(k, kinds, rng)
    ori, proc = _coding_files(k, kinds)
    demo_images.save_png(item['clean'], os.path.join(image_dir, ori))
    demo_images.save_png(item['processed'], os.path.join(image_dir, proc))
    rows.append({
        'id': k + 1,
        'question': item['question'],
        'answers': [item['answer']],
        'ori_image_path': ori,
        'processed_image_path': proc,
        'type': item['kinds'],
        'split': 'simple' if k < n_simple else 'hard'
    })
  _write_json(os.path.join(mat_dir, 'MAT-Benchmark', 'MAT-Coding.json'), rows)
  return rows


def _kinds_text(kinds: list[str]) -> str:
  return '{' + ', '.join(repr(k) for k in kinds) + '}'


def write_coding_training(mat_dir: str, n: int, rng: np.random.Generator) -> list[dict]:
  """rft_agent_code_1_2k.json: per item a problem step, a code step (not for `none`) and an
  answer step whose image is the restored one; each step's context is the earlier steps."""
  image_dir = os.path.join(mat_dir, 'MAT-Training', 'rft_agent_code_1_2k_images')
  rows = []
  for k in range(n):
    kinds = _coding_kinds(k, n_simple=len(SINGLE_TYPES))
    item = _coding_item(k, kinds, rng)
    ori, proc = _coding_files(k, kinds)
    demo_images.save_png(item['clean'], os.path.join(image_dir, ori))
    demo_images.save_png(item['processed'], os.path.join(image_dir, proc))
    start = ori if 'crop' in kinds else proc
    query = f"<query> {item['question']} </query>"
    problem = f"<problem> {_kinds_text(kinds)} </problem>"
    problem_gt = f"<think> The image shows {', '.join(kinds)}; fix it first. </think>\n{problem}"
    rows.append({'type': 'pre_problem', 'image_path': start, 'problem': query, 'solution': problem, 'gt': problem_gt})
    context = problem_gt
    if kinds != ('none',):
      code = f"<code>\n```python\n{item['code']}\n```\n</code>"
      code_gt = f'<think> Restore the image with OpenCV. </think>\n{code}'
      rows.append({
          'type': 'pre_code',
          'image_path': start,
          'problem': query,
          'context': context,
          'solution': code,
          'gt': code_gt
      })
      context = f'{context}\n{code_gt}'
    answer = f"<answer> {item['answer']} </answer>"
    rows.append({
        'type': 'pre_answer',
        'image_path': proc if 'crop' in kinds else ori,
        'problem': query,
        'context': context,
        'solution': answer,
        'gt': f'<think> The restored image reads {item["answer"]}. </think>\n{answer}'
    })
  _write_json(os.path.join(mat_dir, 'MAT-Training', 'rft_agent_code_1_2k.json'), rows)
  return rows


def _information(docs: list[dict]) -> str:
  """The top 4 documents as the released code renders search results (`prompts.search_observation`)."""
  return prompts.search_observation([f"{d['title']}. {d['text']}" for d in docs[:4]], exact=True)


def _retrieved(query: str, docs: list[dict]) -> list[dict]:
  """A deterministic stand-in for retrieval when writing reference chains: documents ranked by
  the words they share with the query (the demo corpus makes the right page win)."""
  words = set(query.lower().split())
  return sorted(
      docs, key=lambda d:
      (-len(words & set(f"{d['title']} {d['text']}".lower().replace('.', ' ').split())), int(d['id'])))


def write_search(out_dir: str, mat_dir: str, sizes: Sizes, rng: np.random.Generator, seed: int) -> dict:
  """MAT-Search benchmark, MAT-Training search steps, FlashRAG-style multi-hop set, corpus."""
  entities = world(seed, sizes.companies)
  docs = corpus(entities)
  _write_jsonl(os.path.join(out_dir, 'corpus.jsonl'), docs)
  for e in entities:
    demo_images.save_png(
        demo_images.logo_image(e),
        os.path.join(mat_dir, 'MAT-Benchmark', 'MAT-Search-image', f"{e['company'].split()[0].lower()}.png"))

  # Benchmark: first half one-hop (simple), second half two-hop (hard), as in MAT-Search.
  n = sizes.search_benchmark
  bench = []
  for k in range(n):
    e = entities[k % len(entities)]
    one_hop, two_hop = questions(e)[0], questions(e)[1 + k % 2]
    question, _, answers, _ = one_hop if k < n // 2 else two_hop
    bench.append({
        'id': k + 1,
        'question': question,
        'answer': answers[0],
        'image_path': f"{e['company'].split()[0].lower()}.png"
    })
  _write_json(os.path.join(mat_dir, 'MAT-Benchmark', 'MAT-Search.json'), bench)

  # Training: the reference chain of each item, one row per step (search ..., answer).
  image_dir = os.path.join(mat_dir, 'MAT-Training', 'rft_agent_search_20_images')
  train = []
  order = rng.permutation(len(entities))
  for k in range(sizes.search_training):
    e = entities[int(order[k % len(entities)])]
    question, _, answers, hops = questions(e)[k % 3]
    image_name = f"train_{k}_{e['company'].split()[0].lower()}.png"
    demo_images.save_png(demo_images.logo_image(e), os.path.join(image_dir, image_name))
    chain = f'<query> {question} </query>'
    for step, query in enumerate(reference_queries(e, hops, question)):
      think = ('<think> The logo shows ' + e['company'] +
               '; I need to look it up. </think>' if step == 0 else '<think> Now I need the next fact. </think>')
      search = f'<search> {query} </search>'
      train.append({'image_path': image_name, 'problem': chain, 'solution': search, 'gt': f'{think}\n{search}'})
      chain = f'{chain}\n{think}\n{search}\n{_information(_retrieved(query, docs))}'
    answer = f'<answer> {answers[0]} </answer>'
    train.append({
        'image_path': image_name,
        'problem': chain,
        'solution': answer,
        'gt': f'<think> The documents give the answer. </think>\n{answer}'
    })
  _write_json(os.path.join(mat_dir, 'MAT-Training', 'rft_agent_search_20.json'), train)

  multihop = []
  for k in range(sizes.multihop):
    e = entities[(k + 5) % len(entities)]
    _, question, answers, _ = questions(e)[k % 3]
    multihop.append({
        'id': f'test_{k}',
        'question': question,
        'golden_answers': answers,
        'metadata': {
            'hops': questions(e)[k % 3][3]
        }
    })
  _write_jsonl(os.path.join(out_dir, 'FlashRAG_datasets', 'demo', 'test.jsonl'), multihop)
  return {'corpus': len(docs), 'search_benchmark': len(bench), 'search_training': len(train), 'multihop': len(multihop)}


def generate(out_dir: str, seed: int = 0, sizes: Sizes = Sizes()) -> dict:
  """Writes the whole demo under `out_dir`; returns `layout(out_dir)` plus item counts.

  TFDS folders prepared from an earlier demo in the same place (`<manual dir>/tfds`, the
  builders' default) are removed so that they are rebuilt from the new files.
  """
  paths = layout(out_dir)
  for manual_dir in (paths['mat_dir'], paths['flashrag_dir']):
    shutil.rmtree(os.path.join(manual_dir, 'tfds'), ignore_errors=True)
  rng = np.random.default_rng(seed)
  counts = {
      'coding_benchmark': len(write_coding_benchmark(paths['mat_dir'], sizes.coding_benchmark, rng)),
      'coding_training': len(write_coding_training(paths['mat_dir'], sizes.coding_training, rng)),
  }
  counts.update(write_search(out_dir, paths['mat_dir'], sizes, rng, seed))
  return {**paths, 'counts': counts}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description='Write the embedded varft demo data.')
  parser.add_argument('--out', required=True, help='output folder')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  info = generate(args.out, seed=args.seed)
  print(json.dumps(info, indent=1))


if __name__ == '__main__':
  main()
