"""Resuming with another topology or other settings (issue 23, items 5 and 7), in process.

The data position of a run is a function of its step (`data.ResumableBatches.seek`,
`StepSampler.seek`), so a checkpoint whose per-process data states do not fit this run (another
process count, another grain worker count) resumes by seeking; a checkpoint of other data is
refused, never seeked. The end-to-end elastic run (2 processes x 4 devices -> 1 x 4) is in
tests/test_multiprocess.py. Config changes are refused by `config_checks.check_workdir_config`,
and a finished run asked for fewer steps than it has is one clear error.
"""

from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from configs import vicreg
from embedspace import data
from embedspace import methods
from embedspace.core import checkpointing
from embedspace.core import config_checks
from embedspace.multimodal.data import StepSampler

flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags.


@pytest.fixture(scope="module")
def source():
  return data.get_source("embedded_fashion_mnist", split="test")[0]


def _batches(source, *, workers: int = 0, seed: int = 0) -> data.ResumableBatches:
  loader = data.ssl_loader(source, global_batch_size=8, seed=seed, image_size=28,
                           worker_count=workers)
  return data.ResumableBatches(loader, local_batch_size=8)


@pytest.mark.parametrize("workers,steps", [(0, 0), (0, 1), (0, 5), (2, 3)])
def test_seek_is_where_iterating_gets(source, workers, steps):
  walked, sought = _batches(source, workers=workers), _batches(source, workers=workers)
  for _ in range(steps):
    next(walked)
  sought.seek(steps)
  assert json.loads(sought.get_state()) == json.loads(walked.get_state())
  np.testing.assert_array_equal(next(sought)["view1"], next(walked)["view1"])


def _state(step: int):
  return {"w": jnp.full((4,), float(step)), "step": jnp.int32(step)}


def _saved(tmp_path, source, *, workers: int = 0):
  """Checkpoints of steps 2 and 3 of a `_batches` iterator; returns their directory."""
  directory = tmp_path / "checkpoints"
  ckpt = checkpointing.Checkpointer(directory, every=1, keep=5)
  it = _batches(source, workers=workers)
  for step in (1, 2, 3):
    next(it)
    if step > 1:
      ckpt.save(step, _state(step), it)
  ckpt.close()
  return directory


def _restore(directory, it):
  ckpt = checkpointing.Checkpointer(directory, every=1, keep=5)
  try:
    return ckpt.restore_latest(checkpointing.abstract_like(_state(0)), it)
  finally:
    ckpt.close()


def test_another_process_count_resumes_from_the_step(source, tmp_path, caplog):
  directory = _saved(tmp_path, source)
  for step in ("2", "3"):  # As 2 processes save (each its own file): none of this run's.
    data_dir = directory / step / "data"
    os.rename(data_dir / "process_0-of-1.json", data_dir / "process_1-of-2.json")
  it = _batches(source)
  state, step = _restore(directory, it)
  assert step == 3 and float(state["w"][0]) == 3.0
  assert ("its data position was saved by 2 process(es) and this run has 1; the data order "
          "continues from step 3") in caplog.text
  expected = _batches(source)
  expected.seek(3)
  np.testing.assert_array_equal(next(it)["view1"], next(expected)["view1"])
  assert not os.path.exists(tmp_path / "checkpoints_damaged")


def test_another_worker_count_resumes_instead_of_reading_as_damage(source, tmp_path, caplog):
  # Was: grain refused the state ("Worker count in checkpoint does not match"), every checkpoint
  # counted as damaged and the run said to move them away, though data.worker_count is a key
  # config_checks lets a resume change.
  directory = _saved(tmp_path, source, workers=0)
  it = _batches(source, workers=2)
  state, step = _restore(directory, it)
  assert step == 3 and "another data layout (worker count or sampler)" in caplog.text
  walked = _batches(source, workers=2)
  for _ in range(3):
    next(walked)
  assert json.loads(it.get_state()) == json.loads(walked.get_state())
  assert not os.path.exists(tmp_path / "checkpoints_damaged")


def test_a_position_in_other_data_is_refused_not_seeked(source, tmp_path):
  directory = _saved(tmp_path, source)
  with pytest.raises(checkpointing.IncompatibleCheckpointError,
                     match=r"trained on other data: sampler .*seed=.*\(this run: .*config\.json"):
    _restore(directory, _batches(source, seed=1))
  assert sorted(os.listdir(directory)) == ["2", "3"]  # Nothing moved aside.


def test_a_step_sampler_resumes_from_the_step(tmp_path, caplog):
  class Counter(StepSampler):
    def __init__(self):
      self.seed, self.step = 7, 0

    def batch(self, step):
      return {"x": np.full((2,), step + self.seed)}

  directory = tmp_path / "checkpoints"
  ckpt = checkpointing.Checkpointer(directory, every=1, keep=2)
  sampler = Counter()
  next(sampler), next(sampler)
  ckpt.save(2, _state(2), sampler)
  ckpt.close()
  os.rename(directory / "2" / "data" / "process_0-of-1.json",
            directory / "2" / "data" / "process_0-of-4.json")
  restored = Counter()
  _, step = _restore(directory, restored)
  assert step == 2 and restored.step == 2 and "saved by 4 process(es)" in caplog.text


def test_a_changed_dataset_is_a_config_change_not_damage(tmp_path):
  workdir = str(tmp_path / "wd")
  os.makedirs(os.path.join(workdir, "checkpoints", "6"))
  config = vicreg.get_config("smoke")
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json())
  other = vicreg.get_config("smoke")
  other.data.name = "embedded_mnist"
  # Was: "no checkpoint under ... can be restored ... Move ... away to start from scratch".
  with pytest.raises(config_checks.ConfigError,
                     match=r"config\.data\.name='embedded_fashion_mnist' \(now 'embedded_mnist'\).*"
                           r"resume that run with --config\.data\.name=embedded_fashion_mnist"):
    config_checks.check_workdir_config(other, workdir)


def test_fewer_steps_than_a_finished_run_has_is_one_clear_error(smoke_workdir, tmp_path):
  workdir = str(tmp_path / "wd")
  shutil.copytree(smoke_workdir, workdir)  # Trained to step 6.
  config = vicreg.get_config("smoke")
  config.num_steps, config.eval_every, config.eval.at_end = 3, 0, False
  # Was: it evaluated step 6 without a word.
  with pytest.raises(config_checks.ConfigError,
                     match=r"trained to step 6, past config\.num_steps=3; pass "
                           r"--config\.num_steps=6"):
    methods.train_and_evaluate(config, workdir)
  assert not os.path.exists(os.path.join(workdir, "config_history.jsonl"))
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["num_steps"] == 6
