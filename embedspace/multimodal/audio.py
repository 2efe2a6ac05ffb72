"""Speech as the models see it: mu-law storage, fixed-length clips, the log-mel front end.

The package ships the Free Spoken Digit Dataset as 8 kHz 8-bit mu-law (ITU-T G.711, the
telephone codec the recordings' 8 kHz rate comes from), which halves int16's size at a
quantisation noise well below the recordings' own. The encoders see a log-mel spectrogram
computed from the waveform inside the jitted step (`log_mel`): 25 ms Hann windows every 10 ms,
a power spectrum, a triangular mel filterbank (Slaney/HTK-style, as in the keyword-spotting
front ends of Warden 2018, "Speech Commands") and a log, so augmentation stays in the waveform.
Recordings from elsewhere are read with `read_wav`, which resamples them to 8 kHz with a
polyphase low-pass filter, so what lies above 4 kHz is removed rather than folded back into the
band the models hear.
"""

from __future__ import annotations

import functools
import math
import struct

import jax
import jax.numpy as jnp
import numpy as np
from scipy import signal
from scipy.io import wavfile

SAMPLE_RATE = 8000
"""FSDD's sampling rate (Hz)."""

MU = 255
"""mu of the 8-bit mu-law codec."""


def mulaw_encode(x: np.ndarray) -> np.ndarray:
  """int16 PCM -> uint8 mu-law codes.

  y = sign(x) ln(1 + mu |x|) / ln(1 + mu) for x = pcm / 32768 in [-1, 1), mapped to
  round((y + 1) / 2 * 255).

  Args:
    x: int16 `[...]` samples.

  Returns:
    uint8 `[...]`.

  Raises:
    ValueError: if `x` is not int16.
  """
  x = np.asarray(x)
  if x.dtype != np.int16:
    raise ValueError(f"mulaw_encode takes int16 PCM, got {x.dtype}")
  v = x.astype(np.float64) / 32768.0
  y = np.sign(v) * np.log1p(MU * np.abs(v)) / np.log1p(MU)
  return np.round((y + 1) / 2 * 255).astype(np.uint8)


def mulaw_decode(codes: np.ndarray) -> np.ndarray:
  """uint8 mu-law codes -> float32 samples in [-1, 1] (the inverse of `mulaw_encode`).

  x = sign(y) ((1 + mu)^|y| - 1) / mu with y = 2 code / 255 - 1.
  """
  y = np.asarray(codes, np.float32) / 255 * 2 - 1
  return (np.sign(y) * np.expm1(np.abs(y) * np.log1p(MU)) / MU).astype(np.float32)


_WAV_FORMATS = ("8-bit unsigned or 16-, 24- or 32-bit signed PCM, or 32- or 64-bit float in "
                "[-1, 1], any number of channels, any rate")


def read_wav(path: str, *, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
  """A `.wav` file as a float32 mono waveform at `sample_rate` Hz in [-1, 1].

  Read with `scipy.io.wavfile.read`. 8-bit PCM (unsigned) becomes `(x - 128) / 128`, 16-, 24- and
  32-bit PCM `x / 2^(bits - 1)` (scipy left-aligns 24-bit samples in int32), float samples are
  taken as they are; channels are averaged. Another rate is resampled with
  `scipy.signal.resample_poly` by `up / down = sample_rate / rate` in lowest terms: upsample by
  `up`, low-pass with a Kaiser-windowed FIR at the lower Nyquist frequency, keep every `down`-th
  sample. Content above `sample_rate / 2` is removed (~-55 dB) instead of aliased: a 6 kHz tone
  recorded at 44.1 kHz does not come out as 2 kHz at 8 kHz, as with linear interpolation. The
  passband ripple is ~0.1%, the recording is taken as silence beyond its ends (so its first and
  last ~10 output samples feel the edge), and the result is clipped to [-1, 1] (the filter can
  overshoot a full-scale recording by ~0.1%).

  Args:
    path: a WAV file.
    sample_rate: output rate in Hz (the models' `SAMPLE_RATE` by default).

  Returns:
    float32 `[num_samples]`, `num_samples = ceil(frames * sample_rate / rate)`.

  Raises:
    ValueError: the file is not a WAV file of a kind listed above (one line naming the file and
      the kinds that work), a float file holds non-finite samples or samples outside [-1, 1], or
      `sample_rate < 1`.
    FileNotFoundError: no file at `path`.
  """
  if sample_rate < 1:
    raise ValueError(f"sample_rate must be >= 1 Hz; got {sample_rate}.")
  try:
    rate, data = wavfile.read(path)
  except (ValueError, EOFError, struct.error) as e:
    reason = " ".join(str(e).split())
    raise ValueError(f"{path} is not a PCM WAV file read_wav can read ({reason}); it reads "
                     f"{_WAV_FORMATS}.") from None
  data = np.asarray(data)
  if data.dtype == np.uint8:
    x = (data.astype(np.float64) - 128.0) / 128.0
  elif data.dtype.kind == "i":
    x = data.astype(np.float64) / float(2 ** (8 * data.dtype.itemsize - 1))
  elif data.dtype.kind == "f":
    x = data.astype(np.float64)
    if not np.all(np.isfinite(x)) or (x.size and np.max(np.abs(x)) > 1.0):
      raise ValueError(f"{path} holds float samples that are not finite or outside [-1, 1] "
                       f"(peak {np.max(np.abs(x)):.4g}); normalise it or save it as 16-bit PCM.")
  else:
    raise ValueError(f"{path} holds {data.dtype} samples; read_wav reads {_WAV_FORMATS}.")
  if x.ndim == 2:
    x = x.mean(axis=1)
  if rate != sample_rate and len(x):
    if rate < 1:
      raise ValueError(f"{path} declares a sample rate of {rate} Hz.")
    g = math.gcd(int(rate), int(sample_rate))
    x = signal.resample_poly(x, int(sample_rate) // g, int(rate) // g)
  return np.clip(x, -1.0, 1.0).astype(np.float32)


def fix_length(x: np.ndarray, length: int) -> np.ndarray:
  """Crops or zero-pads a clip to `length` samples, keeping its loudest part in the middle.

  A longer clip keeps the window of `length` samples with the most energy (the word, not the
  silence around it); a shorter one is centred between zeros.

  Args:
    x: float `[n]` samples.
    length: target number of samples (> 0).

  Returns:
    float32 `[length]`.

  Raises:
    ValueError: if `x` is not 1-D or `length` < 1.
  """
  x = np.asarray(x, np.float32)
  if x.ndim != 1 or length < 1:
    raise ValueError(f"fix_length takes a 1-D clip and length >= 1, got {x.shape}, {length}")
  n = len(x)
  if n >= length:
    energy = np.concatenate([[0.0], np.cumsum(x.astype(np.float64) ** 2)])
    start = int(np.argmax(energy[length:] - energy[:-length]))
    return x[start:start + length]
  out = np.zeros(length, np.float32)
  start = (length - n) // 2
  out[start:start + n] = x
  return out


def augment(x: np.ndarray, rng: np.random.Generator, *, max_shift: int, gain_db: float,
            noise_std: float) -> np.ndarray:
  """A random view of a clip: time shift (zero fill), gain and white noise.

  Args:
    x: float32 `[length]`.
    rng: source of the draws.
    max_shift: shift drawn uniformly from [-max_shift, max_shift] samples.
    gain_db: gain drawn uniformly from [-gain_db, gain_db] dB.
    noise_std: std of the added white noise, relative to the clip's RMS.

  Returns:
    float32 `[length]`.
  """
  shift = int(rng.integers(-max_shift, max_shift + 1)) if max_shift else 0
  y = np.zeros_like(x)
  if shift >= 0:
    y[shift:] = x[:len(x) - shift]
  else:
    y[:shift] = x[-shift:]
  y *= np.float32(10 ** (rng.uniform(-gain_db, gain_db) / 20))
  if noise_std:
    rms = float(np.sqrt(np.mean(y * y)) + 1e-8)
    y += (noise_std * rms * rng.standard_normal(len(y))).astype(np.float32)
  return y


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
  return 2595.0 * np.log10(1.0 + f / 700.0)


@functools.lru_cache(maxsize=8)
def mel_filterbank(*, num_mels: int, n_fft: int, sample_rate: int, fmin: float,
                   fmax: float) -> np.ndarray:
  """Triangular filters on the HTK mel scale, m = 2595 log10(1 + f / 700).

  Returns:
    float32 `[n_fft // 2 + 1, num_mels]`, filter j rising from mel point j to j + 1 and
    falling to j + 2 of `num_mels + 2` equally spaced points in [mel(fmin), mel(fmax)].

  Raises:
    ValueError: if not 0 <= fmin < fmax <= sample_rate / 2 or num_mels < 1.
  """
  if not 0 <= fmin < fmax <= sample_rate / 2 or num_mels < 1:
    raise ValueError(f"need 0 <= fmin < fmax <= {sample_rate / 2} and num_mels >= 1; got "
                     f"fmin={fmin}, fmax={fmax}, num_mels={num_mels}")
  freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
  mels = np.linspace(_hz_to_mel(np.float64(fmin)), _hz_to_mel(np.float64(fmax)), num_mels + 2)
  hz = 700.0 * (10 ** (mels / 2595.0) - 1)
  lo, mid, hi = hz[:-2, None], hz[1:-1, None], hz[2:, None]
  up = (freqs[None] - lo) / (mid - lo)
  down = (hi - freqs[None]) / (hi - mid)
  return np.maximum(0.0, np.minimum(up, down)).T.astype(np.float32)


def num_frames(num_samples: int, *, win_length: int, hop_length: int) -> int:
  """Frames `log_mel` yields for a clip of `num_samples` (no padding)."""
  return 1 + (num_samples - win_length) // hop_length


def log_mel(waveform: jax.Array, *, sample_rate: int = SAMPLE_RATE, win_length: int = 200,
            hop_length: int = 80, n_fft: int = 256, num_mels: int = 40, fmin: float = 20.0,
            fmax: float = 4000.0, floor: float = 1e-6) -> jax.Array:
  """Log-mel spectrogram of a batch of clips, jit-able.

  S[b, t, j] = log(floor + sum_f M[f, j] |FFT_n_fft(w * x[b, t*hop : t*hop + win])[f]|^2)
  with w a periodic Hann window and M `mel_filterbank`. The defaults are 25 ms windows every
  10 ms at 8 kHz and 40 mel bands up to Nyquist.

  Args:
    waveform: float `[batch, samples]` in [-1, 1].
    sample_rate, win_length, hop_length, n_fft, num_mels, fmin, fmax: the front end.
    floor: added before the log.

  Returns:
    float32 `[batch, frames, num_mels]`, frames = `num_frames(samples, ...)`.

  Raises:
    ValueError: if `waveform` is not `[batch, samples]` with samples >= win_length, or
      win_length > n_fft.
  """
  if waveform.ndim != 2 or waveform.shape[1] < win_length:
    raise ValueError(f"log_mel takes waveforms [batch, samples >= {win_length}], got shape "
                     f"{waveform.shape}")
  if win_length > n_fft:
    raise ValueError(f"win_length={win_length} must be <= n_fft={n_fft}")
  t = num_frames(waveform.shape[1], win_length=win_length, hop_length=hop_length)
  index = np.arange(t)[:, None] * hop_length + np.arange(win_length)[None]  # [t, win]
  window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win_length) / win_length)).astype(np.float32)
  frames = waveform.astype(jnp.float32)[:, index] * window  # [b, t, win]
  power = jnp.abs(jnp.fft.rfft(frames, n=n_fft, axis=-1)) ** 2  # [b, t, n_fft/2 + 1]
  fb = mel_filterbank(num_mels=num_mels, n_fft=n_fft, sample_rate=sample_rate, fmin=fmin,
                      fmax=fmax)
  mel = jnp.einsum("btf,fm->btm", power, fb, precision=jax.lax.Precision.HIGHEST)
  return jnp.log(mel + floor)
