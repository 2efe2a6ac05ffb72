"""Audio and text at the edges (issue 22, item 4): WAV files of any kind, queries people type."""

from __future__ import annotations

import logging
import wave

import numpy as np
import pytest
from scipy.io import wavfile

from embedspace.multimodal import audio
from embedspace.multimodal import space
from embedspace.multimodal import text


def _tone(freq: float, rate: int, seconds: float = 1.0, amplitude: float = 1.0) -> np.ndarray:
  return amplitude * np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate)


def _spectrum(x: np.ndarray, rate: int) -> tuple[np.ndarray, np.ndarray]:
  """(frequencies in Hz, amplitudes): a sine of amplitude A at a bin frequency reads A."""
  return np.fft.rfftfreq(len(x), 1 / rate), np.abs(np.fft.rfft(x)) * 2 / len(x)


# ----------------------------------------------------------------------------------------------
# read_wav.


def test_resampling_removes_what_lies_above_nyquist(tmp_path):
  # 6 kHz at 44.1 kHz: linear interpolation to 8 kHz folded it to 2 kHz at full amplitude.
  path = str(tmp_path / "high.wav")
  wavfile.write(path, 44100, _tone(6000, 44100, amplitude=0.9).astype(np.float32))
  x = audio.read_wav(path)
  assert x.dtype == np.float32 and x.shape == (8000,)
  # The tone's abrupt start and end are clicks with energy below 4 kHz too; the filter spreads
  # them over the first and last ~10 samples (1.25 ms). In between, the tone is gone.
  assert np.max(np.abs(x[20:-20])) < 0.01
  freqs, amps = _spectrum(x, 8000)
  assert amps[freqs == 2000][0] < 0.01 and np.max(amps) < 0.01


def test_resampling_keeps_what_lies_below_nyquist(tmp_path):
  path = str(tmp_path / "low.wav")
  wavfile.write(path, 44100, _tone(1000, 44100).astype(np.float32))
  x = audio.read_wav(path)
  assert x.shape == (8000,) and np.max(np.abs(x)) <= 1.0  # clipped: the filter overshoots ~0.1%
  freqs, amps = _spectrum(x, 8000)
  assert freqs[np.argmax(amps)] == 1000
  np.testing.assert_allclose(amps[freqs == 1000][0], 1.0, atol=0.01)
  np.testing.assert_allclose(x[100:-100], _tone(1000, 8000)[100:-100], atol=0.01)
  # Up as well as down; an explicit rate; the same rate is read as it is.
  up = audio.read_wav(path, sample_rate=48000)
  assert up.shape == (48000,)
  freqs, amps = _spectrum(up, 48000)
  assert freqs[np.argmax(amps)] == 1000
  same = str(tmp_path / "same.wav")
  wavfile.write(same, 8000, _tone(1000, 8000, amplitude=0.5).astype(np.float32))
  np.testing.assert_array_equal(audio.read_wav(same), _tone(1000, 8000, amplitude=0.5)
                                .astype(np.float32))


@pytest.mark.parametrize("dtype, samples, expected", [
    (np.uint8, [0, 64, 128, 192, 255], [-1.0, -0.5, 0.0, 0.5, 127 / 128]),
    (np.int16, [-32768, -16384, 0, 16384, 32767], [-1.0, -0.5, 0.0, 0.5, 32767 / 32768]),
    (np.int32, [-2 ** 31, -2 ** 30, 0, 2 ** 30, 2 ** 31 - 1], [-1.0, -0.5, 0.0, 0.5, 1.0]),
    (np.float32, [-1.0, -0.5, 0.0, 0.5, 1.0], [-1.0, -0.5, 0.0, 0.5, 1.0]),
    (np.float64, [-1.0, -0.5, 0.0, 0.5, 1.0], [-1.0, -0.5, 0.0, 0.5, 1.0]),
])
def test_each_sample_format_scales_to_unit_range(tmp_path, dtype, samples, expected):
  path = str(tmp_path / "a.wav")
  wavfile.write(path, 8000, np.array(samples, dtype))
  x = audio.read_wav(path)
  assert x.dtype == np.float32
  np.testing.assert_allclose(x, expected, rtol=0, atol=1e-7)


def test_24_bit_pcm(tmp_path):
  path = str(tmp_path / "a.wav")
  ints = np.array([-2 ** 23, -2 ** 22, 0, 2 ** 22], np.int32)
  with wave.open(path, "wb") as f:
    f.setnchannels(1)
    f.setsampwidth(3)
    f.setframerate(8000)
    f.writeframes(b"".join(int(v).to_bytes(3, "little", signed=True) for v in ints))
  np.testing.assert_allclose(audio.read_wav(path), [-1.0, -0.5, 0.0, 0.5], atol=1e-7)


def test_channels_are_mixed_to_mono(tmp_path):
  path = str(tmp_path / "stereo.wav")
  left, right = _tone(440, 8000, 0.1), 0.5 * np.ones(800)
  wavfile.write(path, 8000, np.round(np.stack([left, right], axis=1) * 16384).astype(np.int16))
  x = audio.read_wav(path)
  assert x.shape == (800,)
  np.testing.assert_allclose(x, (np.round(left * 16384) + 8192) / 32768 / 2, atol=1e-7)
  path = str(tmp_path / "three.wav")
  wavfile.write(path, 8000, np.array([[0.5, -0.25, 0.5]] * 4, np.float32))
  np.testing.assert_allclose(audio.read_wav(path), 0.25, atol=1e-7)


def test_bad_files_are_one_clear_error(tmp_path):
  bad = tmp_path / "bad.wav"
  bad.write_bytes(b"not a wav file at all")
  with pytest.raises(ValueError) as error:
    audio.read_wav(str(bad))
  message = str(error.value)
  assert "\n" not in message and str(bad) in message and "16-, 24- or 32-bit" in message
  assert "not a PCM WAV file" in message  # as space.read_wav always said
  truncated = tmp_path / "truncated.wav"
  wavfile.write(str(truncated), 8000, np.zeros(100, np.int16))
  truncated.write_bytes(truncated.read_bytes()[:30])
  with pytest.raises(ValueError, match="truncated.wav is not a PCM WAV file"):
    audio.read_wav(str(truncated))
  loud = str(tmp_path / "loud.wav")
  wavfile.write(loud, 8000, np.array([0.0, 2.5], np.float32))
  with pytest.raises(ValueError, match=r"outside \[-1, 1\] \(peak 2.5\)"):
    audio.read_wav(loud)
  wavfile.write(loud, 8000, np.array([0.0, np.nan], np.float32))
  with pytest.raises(ValueError, match="not finite"):
    audio.read_wav(loud)
  with pytest.raises(FileNotFoundError):
    audio.read_wav(str(tmp_path / "missing.wav"))
  with pytest.raises(ValueError, match="sample_rate"):
    audio.read_wav(loud, sample_rate=0)


def test_space_read_wav_is_audio_read_wav_at_8khz(tmp_path):
  path = str(tmp_path / "a.wav")
  wavfile.write(path, 22050, (_tone(300, 22050, 0.2) * 20000).astype(np.int16))
  np.testing.assert_array_equal(space.read_wav(path), audio.read_wav(path, sample_rate=8000))


# ----------------------------------------------------------------------------------------------
# Text queries.

# The vocabulary the shipped checkpoints were trained with, in id order.
_SHIPPED_VOCABULARY = (
    "<pad>", "<bos>", "<eos>", "<unk>", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "a",
    "an", "digit", "eight", "five", "four", "handwritten", "image", "nine", "number", "of", "one",
    "photo", "recording", "saying", "seven", "six", "someone", "spoken", "the", "three", "two",
    "word", "zero")


def _shipped_tokenize(texts, max_length):
  """The tokenizer the shipped checkpoints were trained with: lower-cased whitespace words."""
  index = {w: i for i, w in enumerate(_SHIPPED_VOCABULARY)}
  out = np.zeros((len(texts), max_length), np.int32)
  for row, t in enumerate(texts):
    ids = [1] + [index.get(w, 3) for w in t.lower().split()] + [2]
    out[row, :len(ids)] = ids
  return out


def test_every_caption_tokenizes_as_before():
  assert text.vocabulary() == _SHIPPED_VOCABULARY
  for templates in (text.TRAIN_TEMPLATES, text.HELD_OUT_TEMPLATES):
    strings, _ = text.captions(templates)
    for max_length in (8, 10, 16):
      np.testing.assert_array_equal(text.tokenize(strings, max_length=max_length),
                                    _shipped_tokenize(strings, max_length))
    assert not any(text.unknown_words(s) for s in strings)


def test_case_and_punctuation_do_not_matter():
  reference = text.tokenize(["the number seven"], max_length=10)
  for query in ("The number SEVEN.", "  the, number: seven!", "The Number Seven?!", "the\tnumber\n"
                "seven", "'the number' (seven)"):
    np.testing.assert_array_equal(text.tokenize([query], max_length=10), reference, err_msg=query)
  assert text.words("A photo of a handwritten 7.") == ["a", "photo", "of", "a", "handwritten", "7"]
  assert text.words("twenty-one, _seven_") == ["twenty", "one", "seven"]


def test_unknown_words_are_reported(caplog):
  assert text.unknown_words("The numbr sevn, the numbr SEVEN") == ["numbr", "sevn"]
  assert text.unknown_words("the number seven") == []
  with caplog.at_level(logging.WARNING):
    tokens = text.tokenize(["the numbr sevn", "the number seven"], max_length=10)
  assert not caplog.records  # off by default: training captions are never checked
  unk = text.vocabulary().index(text.UNK)
  assert list(tokens[0, 2:4]) == [unk, unk]
  with caplog.at_level(logging.WARNING):
    warned = text.tokenize(["the numbr sevn", "the number seven"], max_length=10,
                           warn_unknown=True)
  np.testing.assert_array_equal(warned, tokens)
  assert len(caplog.records) == 1  # only the text with unknown words
  assert "'numbr', 'sevn'" in caplog.records[0].getMessage()
