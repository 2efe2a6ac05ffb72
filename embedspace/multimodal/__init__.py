"""Multimodal embedding spaces: CLIP, ImageBind and DeCUR on MNIST digits, spoken digits and text.

Modules: `audio` (mu-law codec, fixed-length clips, the log-mel front end, waveform
augmentation), `text` (caption templates and a word tokenizer), `data` (the shipped Free Spoken
Digit Dataset, AV-MNIST-style pairing by class, the resumable batch sampler), `models` (audio
and text encoders, the ResNet for images, one module over all modalities), `train` (the
per-device step under `jit(shard_map)`, the loop) and `evaluate` (zero-shot classification,
cross-modal and emergent retrieval, DeCUR's common/unique probes, the report).

Entry point: `python -m embedspace.main --config=configs/clip.py` (also imagebind.py, decur.py).
"""
