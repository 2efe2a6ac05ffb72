"""Embeddings as an interface: models that read the frozen embeddings of a multimodal run.

Both take the image and audio encoders of a trained ImageBind run (`config.encoders_workdir`,
loaded with `embedspace.multimodal.space.load_workdir`), keep them frozen, and train only what
reads their embeddings, through the core's sharded step, checkpoints and metrics.

- PaLM-E-style (Driess et al. 2023; `configs/palme.py`): `palme` (a decoder-only transformer
  language model whose learned projectors map each frozen item vector to soft tokens in its
  token-embedding space; greedy decoding with a KV cache), `palme_data` (questions interleaving
  `<img>` / `<audio>` with words, built from the digits' labels, and their held-out split) and
  `palme_task` (the task: loss on the answer tokens, per-task answer accuracy against a
  text-only baseline).
- FIND-style (Zou et al. 2024): `find*` (a small interface transformer over a scene's feature
  map and a prompt embedding: grounding, retrieval and segmentation) and `scenes` (multi-digit
  scenes with their boxes and masks).

Each is a task (`palme_task.TASK`, `find_task.TASK`) in `embedspace.methods.TASKS`.
"""
