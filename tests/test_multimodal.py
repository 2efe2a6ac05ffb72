"""Multimodal training (CLIP, ImageBind, DeCUR): front ends, data, the sharded step, the loop."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import clip, decur, imagebind
from embedspace import methods, parallel
from embedspace.core import loop
from embedspace.core import step as step_lib
from embedspace.core import train as core_train
from embedspace.core.config_checks import ConfigError
from embedspace.multimodal import audio, data, evaluate, text
from embedspace.multimodal import task as mm_task
from tests import train_steps

CONFIGS = {"clip": clip, "imagebind": imagebind, "decur": decur}
FSDD = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "fsdd", "recordings")


def _numpy_log_mel(x, *, win=200, hop=80, n_fft=256, mels=40):
  fb = audio.mel_filterbank(num_mels=mels, n_fft=n_fft, sample_rate=8000, fmin=20.0, fmax=4000.0)
  window = np.hanning(win + 1)[:-1]  # periodic Hann
  frames = np.stack([x[:, t * hop:t * hop + win] * window
                     for t in range(1 + (x.shape[1] - win) // hop)], axis=1)
  power = np.abs(np.fft.rfft(frames, n=n_fft, axis=-1)) ** 2
  return np.log(power @ fb + 1e-6)


def test_log_mel_matches_a_numpy_reference_and_filters_cover_the_band():
  x = np.random.default_rng(0).uniform(-0.5, 0.5, (3, 1000)).astype(np.float32)
  got = np.asarray(audio.log_mel(x))
  assert got.shape == (3, audio.num_frames(1000, win_length=200, hop_length=80), 40)
  np.testing.assert_allclose(got, _numpy_log_mel(x.astype(np.float64)), atol=2e-3)
  fb = audio.mel_filterbank(num_mels=40, n_fft=256, sample_rate=8000, fmin=20.0, fmax=4000.0)
  assert fb.shape == (129, 40) and np.all(fb.max(axis=0) > 0.5)
  with pytest.raises(ValueError, match="waveforms"):
    audio.log_mel(x[0])
  with pytest.raises(ValueError, match="fmin"):
    audio.mel_filterbank(num_mels=40, n_fft=256, sample_rate=8000, fmin=20.0, fmax=5000.0)


def test_mulaw_round_trip_and_fix_length():
  pcm = np.array([-32768, -1000, -1, 0, 1, 1000, 32767], np.int16)
  back = audio.mulaw_decode(audio.mulaw_encode(pcm)) * 32768
  assert np.all(np.abs(back - pcm) <= np.abs(pcm.astype(np.float32)) * 0.04 + 8)
  with pytest.raises(ValueError, match="int16"):
    audio.mulaw_encode(pcm.astype(np.float32))
  x = np.zeros(100, np.float32)
  x[70:80] = 1.0
  np.testing.assert_array_equal(audio.fix_length(x, 10), np.ones(10))  # the loudest window
  padded = audio.fix_length(np.ones(4, np.float32), 10)
  assert padded.tolist() == [0, 0, 0, 1, 1, 1, 1, 0, 0, 0]


def test_shipped_fsdd_asset_is_compact_complete_and_split_officially():
  assert os.path.getsize(data.ASSET) < 8e6
  fsdd = data.load_fsdd()
  assert len(fsdd["clips"]) == 3000 and set(fsdd["speaker"]) == set(range(6))
  assert max(len(c) for c in fsdd["clips"]) == data.MAX_SAMPLES
  assert np.sum(fsdd["index"] < 5) == 300  # FSDD's official test split
  splits = data.load_splits(num_samples=2000, text_length=10)
  assert len(splits["train"].audio) == 2700 and len(splits["eval"].audio) == 300
  assert len(splits["train"].image) == 8000 and len(splits["eval"].image) == 2000
  assert np.bincount(splits["eval"].audio_speaker).tolist() == [50] * 6


def _fake_tfds(name, split, data_dir):
  """Records shaped as TFDS `mnist` / `spoken_digit` give them (int64 PCM, bytes file names)."""
  del data_dir
  rng = np.random.default_rng(0)
  if name == "mnist":
    n = 60 if split == "train" else 20
    return [{"image": rng.integers(0, 256, (28, 28, 1), np.uint8), "label": i % 10}
            for i in range(n)]
  assert name == "spoken_digit" and split == "train"
  return [{"audio": rng.integers(-3000, 3000, 900 + i).astype(np.int64), "label": d,
           "audio/filename": f"{d}_{speaker}_{index}.wav".encode()}
          for i, (d, speaker, index) in enumerate(
              (d, s, k) for d in (3, 1) for s in ("theo", "george") for k in (7, 0, 5, 2))]


def test_tfds_source_reads_mnist_and_spoken_digit_records(monkeypatch):
  monkeypatch.setattr(data, "tfds_records", _fake_tfds)
  splits = data.load_splits.__wrapped__(num_samples=1000, text_length=10, source="tfds")
  train, ev = splits["train"], splits["eval"]
  assert train.image.shape == (60, 28, 28, 1) and ev.image.shape == (20, 28, 28, 1)
  assert train.image_raw.dtype == np.uint8
  assert ev.image_label.tolist() == [i % 10 for i in range(20)]
  # Official split by recording index (0-4 eval), sorted by (digit, speaker, index).
  assert len(ev.audio) == 8 and len(train.audio) == 8 and train.audio.shape[1] == 1000
  assert ev.audio_label.tolist() == [1, 1, 1, 1, 3, 3, 3, 3]
  assert [data.SPEAKERS[s] for s in ev.audio_speaker[:4]] == ["george", "george", "theo", "theo"]
  assert np.abs(train.audio).max() <= 3000 / 32768 + 1e-6 and np.abs(train.audio).max() > 0.05
  with pytest.raises(ValueError, match="not an FSDD file name"):
    data.fsdd_from_records([{"audio": np.zeros(5), "audio/filename": b"seven.wav"}])


def test_tfds_source_without_prepared_data_says_how_to_get_it(tmp_path):
  with pytest.raises(FileNotFoundError, match="tfds build mnist --file_format=array_record"):
    data.load_splits(num_samples=1000, text_length=10, source="tfds", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="source"):
    data.load_splits(num_samples=1000, text_length=10, source="web")


@pytest.mark.skipif(not os.path.isdir(FSDD), reason="FSDD wav files not staged")
def test_asset_regenerates_from_the_wav_files(tmp_path):
  names = ["0_george_0.wav", "7_jackson_32.wav", "9_yweweler_49.wav", "3_theo_5.wav"]
  src = tmp_path / "wav"
  src.mkdir()
  for name in names:
    os.symlink(os.path.abspath(os.path.join(FSDD, name)), src / name)
  data.build_fsdd_asset(str(src), str(tmp_path / "a.npz.xz"))
  small, shipped = data.load_fsdd(str(tmp_path / "a.npz.xz")), data.load_fsdd()
  for i in range(len(names)):
    key = (small["digit"][i], small["speaker"][i], small["index"][i])
    j = np.flatnonzero((shipped["digit"] == key[0]) & (shipped["speaker"] == key[1])
                       & (shipped["index"] == key[2]))[0]
    np.testing.assert_array_equal(small["clips"][i], shipped["clips"][j])


def test_captions_tokenize_and_held_out_prompts_are_never_trained():
  train_caps, _ = text.captions(text.TRAIN_TEMPLATES)
  held_caps, held_labels = text.captions(text.HELD_OUT_TEMPLATES)
  assert "a recording of the number seven" in train_caps and "7" in train_caps
  assert not set(train_caps) & set(held_caps) and held_labels.tolist()[:10] == list(range(10))
  tokens = text.tokenize(held_caps, max_length=10)
  assert "<unk>" not in [text.vocabulary()[t] for t in tokens.ravel()]
  assert np.all(tokens[np.arange(len(tokens)), text.eos_position(tokens)] ==
                text.vocabulary().index(text.EOS))
  with pytest.raises(ValueError, match="max_length"):
    text.tokenize(["a b c d e f g h i"], max_length=10)


def test_config_variants_and_bad_values_fail_clearly():
  with pytest.raises(ValueError, match="unknown config variant"):
    clip.get_config("smokey")
  assert imagebind.get_config("direct,smoke").pairs == "audio-text"
  assert decur.get_config("barlow").loss.name == "barlow"
  for key, value, match in [("pairs", "image-smell", "pairs"),
                            ("loss.num_common", 16, "num_common"),
                            ("data.source", "web", "data.source"),
                            ("data.text_length", 7, "text_length")]:
    config = decur.get_config("smoke")
    target, *parents = config, *key.split(".")[:-1]
    for p in parents:
      target = target[p]
    target[key.split(".")[-1]] = value
    with pytest.raises(ConfigError, match=match):
      mm_task.validate(config)


def test_emergent_retrieval_is_measured_on_pairs_never_seen_in_training():
  config = imagebind.get_config("smoke")
  splits = data.load_splits(num_samples=config.data.audio_samples, text_length=10)
  sampler = mm_task.make_sampler(config, splits["train"])
  seen_audio, seen_captions, keys = set(), set(), set()
  for step in range(50):
    index = sampler.indices(step)
    keys |= set(index)
    seen_audio |= set(splits["train"].audio_id[index["image-audio/audio"]].tolist())
    seen_captions |= {splits["train"].captions[i] for i in index["image-text/text"]}
  # No batch pairs audio with text: the only pairs are anchored on images.
  assert keys == {"image-audio/image", "image-audio/audio", "image-text/image", "image-text/text"}
  assert set(next(sampler)) == keys
  # The clips and captions of the emergent-retrieval measurement are never in a training batch.
  assert not seen_audio & set(splits["eval"].audio_id.tolist())
  assert not seen_captions & set(splits["eval"].captions)
  assert len(seen_audio) > 300 and len(seen_captions) == 100


def _batches(config, n):
  splits = data.load_splits(num_samples=config.data.audio_samples, text_length=10)
  sampler = mm_task.make_sampler(config, splits["train"])
  return [next(sampler) for _ in range(n)]


def _stepper(config, devices):
  """(initial replicated state, compiled step, mesh) on `devices`; one compile serves many runs."""
  mesh = parallel.make_mesh(devices)
  run = core_train.prepare(methods.task(config.method), config, mesh)
  init = jax.device_get(run.state)  # host copy: steps donate
  return init, run.parallel_step(mesh), mesh


def _max_diff(a, b):
  return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def imagebind_steppers():
  """ImageBind `:smoke` steps compiled on 1 and on 8 devices (each compiled once)."""
  config = imagebind.get_config("smoke")
  return config, _stepper(config, jax.devices()[:1]), _stepper(config, jax.devices()[:8])


def test_multimodal_step_on_eight_devices_matches_one_device(imagebind_steppers):
  # ImageBind's step has all three encoders (batch norm in two of them) and two clip losses.
  config, one, eight = imagebind_steppers
  batches = _batches(config, 2)
  loss1, state1 = train_steps.run_compiled(one, batches)
  loss8, state8 = train_steps.run_compiled(eight, batches)
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  assert loss1[0] != loss1[1]
  # The float32 floor: the same global batch with its rows permuted (within each pair) on one
  # device; 8 devices must be as close to 1 device as that.
  perm = np.random.default_rng(1).permutation(config.batch_size)
  _, state_perm = train_steps.run_compiled(one, [{k: v[perm] for k, v in b.items()} for b in batches])
  assert _max_diff(state8.params, state1.params) <= 4 * max(
      _max_diff(state_perm.params, state1.params), 1e-6)
  assert _max_diff(state8.batch_stats, state1.batch_stats) <= 4 * max(
      _max_diff(state_perm.batch_stats, state1.batch_stats), 1e-6)


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
  """Each config's `:smoke` run, end to end (ImageBind with the heatmap drawn)."""
  runs = {}
  for name, module in CONFIGS.items():
    config = module.get_config("smoke")
    config.eval.plots = name == "imagebind"
    workdir = str(tmp_path_factory.mktemp(name))
    if name == "imagebind":  # Preempted by SIGTERM in step 3, then the same command again.
      with pytest.MonkeyPatch.context() as mp:
        mp.setattr(step_lib, "make_parallel_step", train_steps.sigterm_during_step(3))
        with pytest.raises(loop.Preempted) as exc:
          methods.train_and_evaluate(config, workdir)
        assert exc.value.code == loop.PREEMPTED_EXIT_CODE and exc.value.step == 3
    runs[name] = (workdir, methods.train_and_evaluate(config, workdir), config)
  return runs


@pytest.mark.parametrize("name", ["clip", "imagebind", "decur"])
def test_smoke_config_trains_checkpoints_and_reports(smoke_runs, name):
  workdir, report, config = smoke_runs[name]
  for path in ("eval.json", "metrics.jsonl", "config.json", "eval/report.md"):
    assert os.path.exists(os.path.join(workdir, path)), path
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")))
  assert steps == ([3, 4] if name == "imagebind" else [2, 4])  # ImageBind's saved at SIGTERM
  with open(os.path.join(workdir, "eval.json"), encoding="utf-8") as f:
    assert json.load(f) == json.loads(json.dumps(report))
  assert report["retrieval"] and report["probe"]
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  records = [r for r in records if "loss" in r]
  assert records[-1]["step"] == config.num_steps and np.isfinite(records[-1]["loss"])
  if name == "clip":
    assert 0 <= report["zero_shot"]["image"] <= 1 and report["retrieval"]["image->text"]["trained"]
  if name == "imagebind":
    assert os.path.exists(os.path.join(workdir, "eval", "similarity.png"))
    for direction in ("audio->text", "text->audio"):
      assert report["retrieval"][direction]["trained"] is False  # emergent
    assert {"audio", "image"} <= set(report["zero_shot"]) and "arithmetic" in report
  if name == "decur":
    assert set(report["probe"]["audio"]["speaker"]) == {"all", "common", "unique"}
    assert report["retrieval"]["image->audio (common dims)"]["trained"]  # the trained pair, cut


def test_preempted_and_resumed_run_equals_plain_steps(smoke_runs, imagebind_steppers):
  workdir, _, config = smoke_runs["imagebind"]
  _, _, eight = imagebind_steppers
  _, state = train_steps.run_compiled(eight, _batches(config, config.num_steps))
  restored = ocp.StandardCheckpointer().restore(
      os.path.join(workdir, "checkpoints", str(config.num_steps), "state"))
  jax.tree.map(np.testing.assert_array_equal, restored["params"], state.params)
  jax.tree.map(np.testing.assert_array_equal, restored["batch_stats"], state.batch_stats)


def test_zero_shot_and_chance_levels_on_constructed_embeddings():
  labels = np.repeat(np.arange(10), 3)
  t = np.eye(10)[labels] + 0.01
  protos = evaluate.prototypes(t, labels)
  assert evaluate.zero_shot_accuracy(np.eye(10)[labels], labels, protos) == 1.0
  # Chance recall@1 is the share of relevant keys; recall@N is 1.
  assert evaluate.chance_recall(30, np.array([3]), 1) == pytest.approx(0.1)
  assert evaluate.chance_recall(30, np.array([3]), 30) == pytest.approx(1.0)
  row = evaluate.retrieval_row(np.eye(10)[labels], labels, t, labels)
  assert row["recall@1"] == 1.0 and row["chance_recall@1"] == pytest.approx(0.1)
