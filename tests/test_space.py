"""A multimodal run as one space: raw images, recordings and captions in; search across them."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import wave

import numpy as np
import pytest

from embedspace import queries as query_lib
from embedspace.multimodal import audio as audio_lib
from embedspace.multimodal import data as mm_data
from embedspace.multimodal import evaluate as mm_evaluate
from embedspace.multimodal import space as space_lib
from embedspace.space import search
from embedspace.space import store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def space(imagebind_smoke_workdir):
  return space_lib.load(imagebind_smoke_workdir, batch_size=64)


@pytest.fixture(scope="module")
def split(space):
  c = space.config.data
  return mm_data.load_splits(num_samples=c.audio_samples, text_length=c.text_length)["eval"]


def _write_wav(path, samples, *, rate, width=2, channels=1):
  scale = {1: 127, 2: 32767, 4: 2 ** 31 - 1}[width]
  ints = np.round(np.asarray(samples) * scale).astype({1: np.int16, 2: np.int16, 4: np.int32}[
      width])
  raw = (ints + 128).astype(np.uint8).tobytes() if width == 1 else ints.tobytes()
  with wave.open(str(path), "wb") as f:
    f.setnchannels(channels)
    f.setsampwidth(width)
    f.setframerate(rate)
    f.writeframes(raw)


def test_raw_inputs_embed_as_the_evaluation_embeds_its_split(space, split):
  """The evaluation embeds `load_splits`' prepared arrays; the space starts from raw items."""
  reference = mm_evaluate.embed_split(
      mm_evaluate.make_embed_fn(space.model, space.variables), split,
      modalities=("image", "audio", "text"), batch_size=64)
  np.testing.assert_allclose(space.embed("image", split.image_raw[:100]), reference["image"][:100],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(space.embed("image", split.image_raw[:100, ..., 0]),
                             reference["image"][:100], rtol=1e-5, atol=1e-5)  # [n, 28, 28]
  clips = [split.audio[i] for i in range(70)]  # 70 rows: two batches, the second padded
  np.testing.assert_allclose(space.embed("audio", clips), reference["audio"][:70],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(space.embed("text", list(split.captions)), reference["text"],
                             rtol=1e-5, atol=1e-5)
  # A longer recording is cut to its loudest window, a shorter one padded: as in training.
  long = np.concatenate([np.zeros(3000, np.float32), split.audio[0], np.zeros(3000, np.float32)])
  np.testing.assert_array_equal(space.prepare("audio", [long])[0], audio_lib.fix_length(
      long, space.config.data.audio_samples))
  assert space.embed("text", []).shape == (0, space.dim)


def test_bad_items_are_one_clear_error(space, split):
  with pytest.raises(ValueError, match=r"uint8 \[n, 28, 28\]"):
    space.embed("image", split.image)  # normalised floats, not pixels
  with pytest.raises(ValueError, match=r"uint8 \[n, 28, 28\]"):
    space.embed("image", np.zeros((2, 32, 32), np.uint8))
  with pytest.raises(ValueError, match="1-D float waveforms"):
    space.embed("audio", [np.zeros(800, np.int16)])
  with pytest.raises(ValueError, match=r"divide by 32768"):
    space.embed("audio", [np.full(800, 300.0, np.float32)])
  with pytest.raises(ValueError, match="sequence of strings"):
    space.embed("text", "the number seven")
  with pytest.raises(ValueError, match="needs .* tokens"):
    space.embed("text", [" ".join(["seven"] * 40)])
  with pytest.raises(ValueError, match="not 'video'"):
    space.embed("video", [])


def test_a_text_query_with_unknown_words_warns(space, caplog):
  with caplog.at_level(logging.WARNING):
    space.prepare("text", ["the numbr three", "the number three"])
  assert len(caplog.records) == 1 and "'numbr'" in caplog.records[0].getMessage()


def test_read_wav_scales_mixes_and_resamples(tmp_path):
  t = np.arange(16000) / 16000
  tone = 0.5 * np.sin(2 * np.pi * 440 * t)
  _write_wav(tmp_path / "a.wav", tone, rate=16000)
  x = space_lib.read_wav(str(tmp_path / "a.wav"))
  assert x.dtype == np.float32 and len(x) == 8000  # one second at 8 kHz
  # The polyphase resampler's edges ring (tests/test_wav_text.py checks it strictly): compare
  # the interior to the ideal tone.
  np.testing.assert_allclose(x[20:-20], 0.5 * np.sin(2 * np.pi * 440 * np.arange(8000) / 8000)[
      20:-20], atol=1e-3)
  stereo = np.stack([tone[:800], -tone[:800]], axis=1).reshape(-1)  # channels cancel
  _write_wav(tmp_path / "b.wav", stereo, rate=8000, channels=2)
  np.testing.assert_allclose(space_lib.read_wav(str(tmp_path / "b.wav")), 0, atol=1e-4)
  _write_wav(tmp_path / "c.wav", tone[:800], rate=8000, width=1)
  np.testing.assert_allclose(space_lib.read_wav(str(tmp_path / "c.wav")), tone[:800], atol=0.01)
  (tmp_path / "d.wav").write_bytes(b"not a wav file at all")
  with pytest.raises(ValueError, match="not a PCM WAV file"):
    space_lib.read_wav(str(tmp_path / "d.wav"))


def test_files_and_search_across_modalities(space, split, tmp_path):
  # Recordings as FSDD-named .wav files, captions as a .txt file, images from the shipped split.
  folder = tmp_path / "clips"
  folder.mkdir()
  for i in range(6):
    _write_wav(folder / f"{split.audio_label[i]}_x_{i}.wav", split.audio[i], rate=8000)
  _write_wav(folder / "unnamed.wav", split.audio[6], rate=8000)
  data = space_lib.open_data(space, "audio", str(folder))
  assert list(data.labels[:6]) == list(split.audio_label[:6]) and data.labels[6] == -1
  meta = space_lib.embed_to_file(space, "audio", data, str(tmp_path / "clips.npz"))
  f = store.load_embeddings(str(tmp_path / "clips.npz"))
  assert meta["model"]["modality"] == "audio" and f.embeddings.shape == (7, space.dim)
  np.testing.assert_allclose(f.embeddings[:6], space.embed("audio", list(split.audio[:6])),
                             atol=2e-4)  # 16-bit PCM rounding of the waveforms
  (tmp_path / "captions.txt").write_text("the number three\n\nsomeone saying the number five\n")
  text = space_lib.open_data(space, "text", str(tmp_path / "captions.txt"))
  assert text.items == ["the number three", "someone saying the number five"]
  images = space_lib.open_data(space, "image", "shipped:eval")
  np.testing.assert_array_equal(images.labels, split.image_label)
  space_lib.embed_to_file(space, "image", images, str(tmp_path / "images.npz"))
  emb = store.load_embeddings(str(tmp_path / "images.npz"))
  # A caption searches the images: the neighbours are the exact top-k of the caption's vector.
  got = query_lib.run_query(emb, None, k=5, measure="cosine", text="the number three")
  want_v, want_rows = search.top_k(space.embed("text", ["the number three"]), emb.embeddings,
                                   measure="cosine", k=5)
  assert got["rows"] == want_rows[0].tolist()
  np.testing.assert_allclose(got["values"], want_v[0], rtol=1e-5)
  # --normalize: the same search on unit vectors (across modalities the norms differ).
  got = query_lib.run_query(emb, None, k=5, measure="euclidean", text="the number three",
                         normalize=True)
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
  want_v, want_rows = search.top_k(unit(space.embed("text", ["the number three"])),
                                   unit(emb.embeddings), measure="euclidean", k=5)
  assert got["rows"] == want_rows[0].tolist()
  np.testing.assert_allclose(got["values"], want_v[0], rtol=1e-5)
  plain = query_lib.run_query(emb, None, k=5, measure="euclidean", text="the number three")
  assert max(got["values"]) <= 2 and not np.allclose(plain["values"], got["values"])
  # A recording searches them too (ImageBind's audio encoder is bound to the images).
  got = query_lib.run_query(emb, str(folder / "unnamed.wav"), k=3, measure="cosine")
  want_v, want_rows = search.top_k(space.embed("audio", [split.audio[6]]), emb.embeddings,
                                   measure="cosine", k=3)
  assert got["rows"] == want_rows[0].tolist()
  for modality, spec, message in (("audio", "shipped:test", "shipped:train and shipped:eval"),
                                  ("audio", str(tmp_path / "captions.txt"), "folder of .wav"),
                                  ("text", str(folder), r"\.txt file")):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
      space_lib.open_data(space, modality, spec)


def _cli(module, *args):
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="--xla_backend_optimization_level=0")
  return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                        env=env, cwd=ROOT, timeout=300)


def test_cli_embeds_a_modality_and_searches_it_by_caption(imagebind_smoke_workdir, smoke_workdir,
                                                          tmp_path):
  out = tmp_path / "audio.npz"
  r = _cli("embedspace.embed", f"--workdir={imagebind_smoke_workdir}", "--modality=audio",
           "--data=shipped:eval", f"--out={out}", "--noprogress")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "wrote 300 audio embeddings" in r.stdout
  with open(store.sidecar_path(str(out)), encoding="utf-8") as f:
    assert json.load(f)["model"]["modality"] == "audio"
  r = _cli("embedspace.search", f"--embeddings={out}", "--query_text=the number seven", "--k=3")
  assert r.returncode == 0, r.stderr[-2000:]
  assert '3 nearest of 300 to "the number seven"' in r.stdout and "_" in r.stdout  # FSDD ids
  for module, args, message in [
      ("embedspace.embed", [f"--workdir={imagebind_smoke_workdir}", "--data=shipped:eval"],
       "pass --modality=image, audio or text"),
      ("embedspace.embed", [f"--workdir={smoke_workdir}", "--modality=audio",
                            "--data=embedded_fashion_mnist"], "not a multimodal run"),
      ("embedspace.search", [f"--embeddings={out}", "--query=1", "--query_text=seven"],
       "not both"),
  ]:
    r = _cli(module, *args)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.startswith("error: ") and message in r.stderr, r.stderr
