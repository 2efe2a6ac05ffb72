"""Captions of the ten digits and a word-level tokenizer over them.

Each digit gets captions from templates ("a recording of the number seven", "7", "the digit
seven"). The templates are split in two: the training captions come from `TRAIN_TEMPLATES`, and
zero-shot prompts and emergent retrieval use only `HELD_OUT_TEMPLATES`, new combinations of the
same words, so those captions are never seen in training (CLIP's prompt ensembling, Radford et
al. 2021 Sec. 3.1.4, averages the text embeddings of several such prompts per class). The
vocabulary is fixed by the templates, so a tokenizer needs no fitting and has no state.

A query is read as its words (`words`): lower-cased runs of letters and digits, so case and
punctuation do not matter ("The number SEVEN." is "the number seven"). The captions are already
such words, so they read exactly as they always have; a word outside the vocabulary becomes
`<unk>`, which `unknown_words` (and `tokenize(..., warn_unknown=True)`) reports.
"""

from __future__ import annotations

import functools
import re

from absl import logging
import numpy as np

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

TRAIN_TEMPLATES = (
    "{word}",
    "{digit}",
    "the digit {word}",
    "the number {word}",
    "a recording of the number {word}",
    "someone saying {word}",
    "a handwritten {word}",
    "a photo of a handwritten {digit}",
    "the spoken word {word}",
    "an image of the digit {digit}",
)
"""Templates of the training captions; `{word}` is 'seven', `{digit}` is '7'."""

HELD_OUT_TEMPLATES = (
    "a recording of the digit {word}",
    "the number {digit}",
    "a photo of the number {word}",
    "someone saying the number {word}",
)
"""Templates never used in training: zero-shot prompts and the emergent-retrieval gallery."""

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)


def caption(template: str, label: int) -> str:
  """The caption of digit `label` (0-9) from `template`.

  Raises:
    ValueError: if `label` is not in 0-9.
  """
  if not 0 <= int(label) <= 9:
    raise ValueError(f"digit label must be in 0-9, got {label}")
  return template.format(word=DIGIT_WORDS[label], digit=str(label))


def captions(templates: tuple[str, ...]) -> tuple[list[str], np.ndarray]:
  """Every (template, digit) caption: `(strings [10 T], labels int32 [10 T])`, template-major."""
  strings = [caption(t, d) for t in templates for d in range(10)]
  labels = np.tile(np.arange(10, dtype=np.int32), len(templates))
  return strings, labels


@functools.lru_cache(maxsize=1)
def vocabulary() -> tuple[str, ...]:
  """The special tokens, then every word of every caption, sorted."""
  found = set()
  for template in TRAIN_TEMPLATES + HELD_OUT_TEMPLATES:
    for d in range(10):
      found.update(words(caption(template, d)))
  return SPECIALS + tuple(sorted(found))


def vocab_size() -> int:
  return len(vocabulary())


_WORD = re.compile(r"[^\W_]+")
"""A word: a maximal run of letters and digits (`\\w` without the underscore)."""


def words(text: str) -> list[str]:
  """The words `tokenize` reads: lower-cased runs of letters and digits.

  Case, punctuation and spacing are dropped: "The number SEVEN." -> ["the", "number", "seven"];
  "twenty-one" -> ["twenty", "one"]. A caption (lower-case words and single spaces) gives
  exactly `caption.split()`.
  """
  return _WORD.findall(text.lower())


def unknown_words(text: str) -> list[str]:
  """The words of `text` outside the vocabulary (read as `<unk>`), in order, without repeats."""
  known = set(vocabulary())
  return list(dict.fromkeys(w for w in words(text) if w not in known))


def tokenize(texts: list[str] | tuple[str, ...], *, max_length: int,
             warn_unknown: bool = False) -> np.ndarray:
  """Words (`words`) -> ids, as `<bos> w_1 ... w_n <eos> <pad> ...`.

  Unknown words map to `<unk>`. The encoder reads the `<eos>` position (CLIP's text features).

  Args:
    texts: captions or queries.
    max_length: tokens per row, including `<bos>` and `<eos>`.
    warn_unknown: log a warning (absl) naming the unknown words of each text that has some, for
      queries typed by a person; the models know only the captions' words.

  Returns:
    int32 `[len(texts), max_length]`.

  Raises:
    ValueError: if a caption needs more than `max_length` tokens.
  """
  index = {w: i for i, w in enumerate(vocabulary())}
  out = np.full((len(texts), max_length), index[PAD], np.int32)
  for row, text in enumerate(texts):
    if warn_unknown and (unknown := unknown_words(text)):
      logging.warning("%r: %s not in the vocabulary, read as %s (known words: %s).", text,
                      ", ".join(map(repr, unknown)), UNK, " ".join(vocabulary()[len(SPECIALS):]))
    ids = [index[BOS]] + [index.get(w, index[UNK]) for w in words(text)] + [index[EOS]]
    if len(ids) > max_length:
      raise ValueError(f"caption {text!r} needs {len(ids)} tokens > max_length={max_length}")
    out[row, :len(ids)] = ids
  return out


def eos_position(tokens: np.ndarray) -> np.ndarray:
  """Index of `<eos>` in each row of `tokenize`'s output, `[batch]`."""
  return np.argmax(np.asarray(tokens) == vocabulary().index(EOS), axis=-1)
