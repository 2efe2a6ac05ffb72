"""Outputs never replace what they must not (issue 23, items 1 and 7): `store.check_output`,
`python -m embedspace.embed --out` and the input mistakes `embed` names in one line."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from embedspace.space import store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _digest(path) -> str:
  return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_check_output_refuses_what_it_must_never_replace(tmp_path):
  (tmp_path / "images.npy").write_bytes(b"x")
  (tmp_path / "wd").mkdir()
  (tmp_path / "wd" / "config.json").write_text('{"method": "vicreg"}')
  (tmp_path / "folder.npz").mkdir()
  os.mkfifo(tmp_path / "pipe.npz")
  (tmp_path / "side").mkdir()
  (tmp_path / "side" / "e.json").mkdir()
  cases = {
      "images.npy": "is not an .npz path",
      "folder.npz": "is a directory; pass a file path ending in .npz, e.g. .*folder.npz/emb",
      "pipe.npz": "is not a regular file",
      "wd/config.npz": "would replace .*config.json, which is not an embeddings sidecar",
      "side/e.npz": "would replace the directory",
      "missing/deeper/e.npz": None,  # Folders are created.
  }
  for name, message in cases.items():
    for overwrite in (False, True):
      if message is None:
        assert store.check_output(str(tmp_path / name), overwrite=overwrite)
      else:
        with pytest.raises(ValueError, match=message):
          store.check_output(str(tmp_path / name), overwrite=overwrite)
  np.save(tmp_path / "input.npy", np.zeros(3))
  os.symlink(tmp_path / "input.npy", tmp_path / "link.npz")
  with pytest.raises(ValueError, match="would replace the input"):
    store.check_output(str(tmp_path / "link.npz"), overwrite=True,
                       inputs=[str(tmp_path / "input.npy")])


def test_an_existing_embeddings_file_is_replaced_only_when_asked(tmp_path):
  path = str(tmp_path / "e.npz")
  store.save_embeddings(path, np.ones((2, 3)), overwrite=False)
  before = _digest(path)
  with pytest.raises(ValueError, match="e.npz exists; pass --overwrite"):
    store.save_embeddings(path, np.zeros((2, 3)), overwrite=False)
  assert _digest(path) == before
  store.save_embeddings(path, np.zeros((4, 3)), overwrite=True)
  assert store.load_embeddings(path).embeddings.shape == (4, 3)
  assert sorted(os.listdir(tmp_path)) == ["e.json", "e.npz"]  # No temporary file left.
  with pytest.raises(ValueError, match="rows"):  # An incomplete write leaves the old file.
    with store.EmbeddingsWriter(path, num=5, dim=3, ids=np.arange(5)) as w:
      w.write(np.zeros((9, 3)))
  assert store.load_embeddings(path).embeddings.shape == (4, 3)
  assert sorted(os.listdir(tmp_path)) == ["e.json", "e.npz"]


def _embed(*args: str) -> subprocess.Popen:
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.Popen([sys.executable, "-m", "embedspace.embed", "--noprogress", *args],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def test_embed_cli_refuses_bad_outputs_and_inputs_in_one_line(smoke_workdir, tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (6, 28, 28), dtype=np.uint8)
  np.save(tmp_path / "x.npy", images)
  np.save(tmp_path / "fractions.npy", np.linspace(0, 2, 6))
  np.save(tmp_path / "whole.npy", np.arange(6, dtype=np.float64) % 3)
  np.save(tmp_path / "ints.npy", images.astype(np.int32))
  (tmp_path / "text.npy").write_text("not an array")
  (tmp_path / "taken.npz").write_bytes(b"earlier results")
  config = os.path.join(smoke_workdir, "config.json")
  kept = {p: _digest(p) for p in (tmp_path / "x.npy", tmp_path / "taken.npz", config)}
  data = f"--data={tmp_path / 'x.npy'}"
  wd = f"--workdir={smoke_workdir}"
  cases = {  # flags: what the one error line must say (None: it succeeds)
      (data, f"--out={tmp_path / 'x.npy'}"): "is not an .npz path",
      (data, f"--out={smoke_workdir}/config.npz", "--overwrite"): "not an embeddings sidecar",
      (data, f"--out={tmp_path}"): "is a directory",
      (data, "--out=/dev/null"): "is not a regular file",
      (data, f"--out={tmp_path / 'taken.npz'}"): "taken.npz exists; pass --overwrite",
      (data, f"--labels={tmp_path / 'fractions.npy'}", f"--out={tmp_path / 'a.npz'}"):
          r"float64 labels that are not whole numbers \(e\.g\. 0\.4\)",
      (f"--data={tmp_path / 'text.npy'}", f"--out={tmp_path / 'b.npz'}"):
          r"is not a \.npy array file \(it does not start with numpy's \.npy header\)",
      (f"--data={tmp_path / 'ints.npy'}", f"--out={tmp_path / 'c.npz'}"):
          r"int32 \(6, 28, 28\); need uint8 .*convert them with x\.astype\(np\.uint8\)",
      (data, f"--labels={tmp_path / 'whole.npy'}", f"--out={tmp_path / 'taken.npz'}",
       "--overwrite"): None,
  }
  procs = {flags: _embed(wd, *flags) for flags in cases}
  for flags, proc in procs.items():
    out, err = proc.communicate(timeout=300)
    message = cases[flags]
    if message is None:
      assert proc.returncode == 0, err[-3000:]
      continue
    assert proc.returncode == 2, (flags, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    [line] = [l for l in err.splitlines() if l.startswith("error:")]
    assert re.search(message, line), (flags, line)
  assert _digest(tmp_path / "x.npy") == kept[tmp_path / "x.npy"]
  assert _digest(config) == kept[config]
  f = store.load_embeddings(str(tmp_path / "taken.npz"))  # Replaced, as asked.
  assert f.embeddings.shape == (6, 8) and list(f.labels) == [0, 1, 2, 0, 1, 2]
  assert not [n for n in os.listdir(tmp_path) if n.endswith((".tmp", "a.npz", "b.npz", "c.npz"))]
