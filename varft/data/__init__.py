"""Datasets: published files -> uniform example dicts -> shuffled, sharded, resumable batches.

  records.py         the uniform example schema (see its docstring) and record parsing
  json_files.py      the published JSON / JSONL files, read with file and line for every record
  builders.py        TFDS array_record builders: MAT benchmarks, MAT-Training, FlashRAG multi-hop;
                     `load(name, split, manual_dir=..., data_dir=...)` -> random-access source
  input_pipeline.py  grain pipeline: `batches(source, batch_size=..., seed=..., state=...)`
  demo.py            the embedded demo data (`python -m varft.data.demo --out DIR`)

Submodules are imported explicitly (`from varft.data import builders`) so that importing the
package stays cheap for code that only needs the demo or the schema.
"""
