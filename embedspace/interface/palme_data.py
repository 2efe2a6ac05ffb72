"""Multimodal sentences built from the digits' labels: the PaLM-E-style tasks and their splits.

Each example is a question about one MNIST image and/or one FSDD recording, asked with
placeholders that the model replaces by the items' soft tokens, and a one-word answer:

  what_image  q: what digit is shown in <img> ? a: seven
  what_audio  q: what digit is said in <audio> ? a: seven
  same        q: is <img> the same digit as <audio> ? a: yes      (yes/no balanced)
  plus        q: what is <img> plus <audio> ? a: twelve           (zero .. eighteen)

"Never seen in training" means: training prompts take images only from the 8,000 MNIST train
images and recordings only from FSDD's 2,700 train clips; every evaluation prompt takes them from
the 2,000 eval images and FSDD's 300 test clips, so no evaluated item, and no (image, recording)
pair, is in any training prompt. `plus` is also measured on digit combinations that no training
prompt has: the ordered (image digit, audio digit) pairs `HELD_OUT_PLUS` = {(d, d + 3 mod 10)}
(10 of 100) never appear in a training `plus` prompt (`plus_new_combos`); each of their sums is
still the answer to other, trained combinations. Samplers are functions of (seed, step), like
`multimodal.data.PairedBatches`, so a resumed run needs only the step.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from embedspace.multimodal import data as mm_data

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
                "seventeen", "eighteen")
PAD, BOS, EOS, IMG, AUDIO = "<pad>", "<bos>", "<eos>", "<img>", "<audio>"
TEMPLATES = {
    "what_image": "q: what digit is shown in <img> ? a:",
    "what_audio": "q: what digit is said in <audio> ? a:",
    "same": "q: is <img> the same digit as <audio> ? a:",
    "plus": "q: what is <img> plus <audio> ? a:",
}
"""The prompt of each training task; `plus_new_combos` is evaluated with `plus`'s."""
TRAIN_TASKS = tuple(TEMPLATES)
EVAL_TASKS = ("what_image", "what_audio", "same", "plus", "plus_new_combos")
HELD_OUT_PLUS = frozenset((d, (d + 3) % 10) for d in range(10))
"""(image digit, audio digit) combinations never in a training `plus` prompt."""
ANSWER_STEPS = 2
"""Tokens generated per answer: the word and `<eos>`."""


@functools.lru_cache(maxsize=1)
def vocabulary() -> tuple[str, ...]:
  """Special tokens, the placeholders, then every word of the templates and answers."""
  words = {w for t in TEMPLATES.values() for w in t.split()} - {IMG, AUDIO}
  return (PAD, BOS, EOS, IMG, AUDIO) + tuple(sorted(words | set(NUMBER_WORDS) | {"yes", "no"}))


def token_id(word: str) -> int:
  """The id of one vocabulary word. Raises ValueError for a word not in the vocabulary."""
  try:
    return vocabulary().index(word)
  except ValueError:
    raise ValueError(f"{word!r} is not in the PaLM-E vocabulary") from None


def prompt_ids(task: str, *, tokens_per_item: int) -> list[int]:
  """`<bos>` and the task's prompt, each placeholder repeated `tokens_per_item` times.

  Raises:
    ValueError: an unknown task.
  """
  template = TEMPLATES.get("plus" if task == "plus_new_combos" else task)
  if template is None:
    raise ValueError(f"unknown task {task!r}; tasks: {EVAL_TASKS}")
  ids = [token_id(BOS)]
  for word in template.split():
    ids += [token_id(word)] * (tokens_per_item if word in (IMG, AUDIO) else 1)
  return ids


def sequence_length(*, tokens_per_item: int) -> int:
  """Tokens of the longest prompt plus its answer and `<eos>`."""
  return max(len(prompt_ids(t, tokens_per_item=tokens_per_item)) for t in TRAIN_TASKS) + 2


def answer(task: str, image_digit: int, audio_digit: int) -> str:
  """The answer word of a task for the items' digits (-1 where the task has no such item)."""
  if task == "what_image":
    return NUMBER_WORDS[image_digit]
  if task == "what_audio":
    return NUMBER_WORDS[audio_digit]
  if task == "same":
    return "yes" if image_digit == audio_digit else "no"
  return NUMBER_WORDS[image_digit + audio_digit]


@dataclasses.dataclass(frozen=True)
class Examples:
  """Rows of one task or a batch: item indices into a split (-1: none) and the arrays."""
  task: tuple[str, ...]  # [N]
  image_index: np.ndarray  # int32 [N], -1 where the prompt has no image
  audio_index: np.ndarray  # int32 [N], -1 where the prompt has no recording
  answer: tuple[str, ...]  # [N]


def draw(task: str, n: int, rng: np.random.Generator, *, image_label: np.ndarray,
         audio_label: np.ndarray, training: bool) -> Examples:
  """`n` examples of `task` with items drawn from a split's labels.

  `same`: the recording is of the image's digit with probability 1/2, else of another digit,
  uniformly. `plus`: the image and recording are drawn uniformly among the combinations allowed
  (training: all but `HELD_OUT_PLUS`; evaluation: `plus` the same, `plus_new_combos` only them).
  """
  by_class = {m: [np.flatnonzero(labels == c) for c in range(10)]
              for m, labels in (("image", image_label), ("audio", audio_label))}
  pick = lambda m, digits: np.array(  # noqa: E731
      [by_class[m][d][rng.integers(len(by_class[m][d]))] for d in digits], np.int32)
  none = np.full(n, -1, np.int32)
  if task == "what_image":
    images, audios = rng.integers(0, len(image_label), n).astype(np.int32), none
  elif task == "what_audio":
    images, audios = none, rng.integers(0, len(audio_label), n).astype(np.int32)
  elif task == "same":
    a = rng.integers(0, 10, n)
    b = np.where(rng.random(n) < 0.5, a, (a + rng.integers(1, 10, n)) % 10)
    images, audios = pick("image", a), pick("audio", b)
  elif task in ("plus", "plus_new_combos"):
    new = task == "plus_new_combos"
    if new and training:
      raise ValueError("plus_new_combos is an evaluation task only")
    combos = [(a, b) for a in range(10) for b in range(10) if ((a, b) in HELD_OUT_PLUS) == new]
    chosen = np.array(combos)[rng.integers(0, len(combos), n)]
    images, audios = pick("image", chosen[:, 0]), pick("audio", chosen[:, 1])
  else:
    raise ValueError(f"unknown task {task!r}; tasks: {EVAL_TASKS}")
  digit = lambda labels, idx: np.where(idx >= 0, labels[np.maximum(idx, 0)], -1)  # noqa: E731
  answers = tuple(answer(task, int(a), int(b)) for a, b in
                  zip(digit(image_label, images), digit(audio_label, audios)))
  return Examples((task,) * n, images, audios, answers)


def encode(examples: Examples, *, image_vectors: np.ndarray, audio_vectors: np.ndarray,
           tokens_per_item: int, length: int) -> dict[str, np.ndarray]:
  """Training arrays of `examples`: the sequence `<bos> prompt answer <eos> <pad>...`.

  Returns:
    `tokens` int32 `[N, length]`; `answer_mask` float32 `[N, length]` (1 on the answer word and
    its `<eos>`); `image [N, Fi]`, `audio [N, Fa]` float32 (zeros where a row has no such item).
  """
  n = len(examples.task)
  tokens = np.full((n, length), token_id(PAD), np.int32)
  mask = np.zeros((n, length), np.float32)
  for row, (task, word) in enumerate(zip(examples.task, examples.answer)):
    ids = prompt_ids(task, tokens_per_item=tokens_per_item)
    tokens[row, :len(ids) + 2] = ids + [token_id(word), token_id(EOS)]
    mask[row, len(ids):len(ids) + 2] = 1.0
  return {"tokens": tokens, "answer_mask": mask,
          "image": gather(image_vectors, examples.image_index),
          "audio": gather(audio_vectors, examples.audio_index)}


def gather(vectors: np.ndarray, index: np.ndarray) -> np.ndarray:
  """`vectors[index]` as float32, with zero rows where `index` is -1 (no such item)."""
  out = vectors[np.maximum(index, 0)].astype(np.float32)
  out[index < 0] = 0.0
  return out


class PromptBatches(mm_data.StepSampler):
  """Endless training batches of prompts; `get_state`/`set_state` make it an orbax item.

  Row `i` of the global batch of step `s` asks task `TRAIN_TASKS[i % 4]` (equal shares) about
  items drawn with `np.random.default_rng([seed, s, task])` from the train split; this process
  returns its rows `[p B / P, (p + 1) B / P)`.
  """

  def __init__(self, *, image_vectors: np.ndarray, image_label: np.ndarray,
               audio_vectors: np.ndarray, audio_label: np.ndarray, global_batch_size: int,
               seed: int, tokens_per_item: int, process_index: int = 0, process_count: int = 1):
    if global_batch_size % process_count:
      raise ValueError(f"global batch {global_batch_size} does not split over {process_count} "
                       "processes")
    self.image_vectors, self.image_label = image_vectors, image_label
    self.audio_vectors, self.audio_label = audio_vectors, audio_label
    self.global_batch_size, self.seed = global_batch_size, seed
    self.tokens_per_item = tokens_per_item
    self.length = sequence_length(tokens_per_item=tokens_per_item)
    per = global_batch_size // process_count
    self.rows = slice(process_index * per, (process_index + 1) * per)
    self.step = 0

  def examples(self, step: int) -> Examples:
    """The global batch of `step` (every process's rows), task-interleaved."""
    order = np.arange(self.global_batch_size) % len(TRAIN_TASKS)
    parts = {}
    for t, task in enumerate(TRAIN_TASKS):
      parts[task] = draw(task, int(np.sum(order == t)), np.random.default_rng([self.seed, step, t]),
                         image_label=self.image_label, audio_label=self.audio_label,
                         training=True)
    image, audio = np.zeros(len(order), np.int32), np.zeros(len(order), np.int32)
    tasks, answers = [None] * len(order), [None] * len(order)
    for t, task in enumerate(TRAIN_TASKS):
      rows = np.flatnonzero(order == t)
      image[rows], audio[rows] = parts[task].image_index, parts[task].audio_index
      for r, a in zip(rows, parts[task].answer):
        tasks[r], answers[r] = task, a
    return Examples(tuple(tasks), image, audio, tuple(answers))

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's rows of the global batch of `step`, as `encode`'s arrays."""
    ex = self.examples(step)
    mine = Examples(ex.task[self.rows], ex.image_index[self.rows], ex.audio_index[self.rows],
                    ex.answer[self.rows])
    return encode(mine, image_vectors=self.image_vectors, audio_vectors=self.audio_vectors,
                  tokens_per_item=self.tokens_per_item, length=self.length)


def eval_examples(task: str, n: int, *, image_label: np.ndarray, audio_label: np.ndarray,
                  seed: int) -> Examples:
  """The evaluation prompts of `task` on the eval split (fixed by `seed`).

  `what_image` and `what_audio` ask once about each of `n` eval items (all of them when `n`
  covers the split); the pair tasks draw `n` examples.
  """
  rng = np.random.default_rng([seed, 1 + EVAL_TASKS.index(task)])
  if task in ("what_image", "what_audio"):
    labels = image_label if task == "what_image" else audio_label
    idx = np.sort(rng.permutation(len(labels))[:n]).astype(np.int32)
    none = np.full(len(idx), -1, np.int32)
    return Examples((task,) * len(idx), *((idx, none) if task == "what_image" else (none, idx)),
                    tuple(NUMBER_WORDS[d] for d in labels[idx]))
  return draw(task, n, rng, image_label=image_label, audio_label=audio_label, training=False)
