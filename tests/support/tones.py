"""Tone generation and detection on WAV files, for the real-phone tests.

Phones under test play a pure tone as their microphone (``make_tone_wav``) and record what
they hear; a test then asks whether the *other* side's tone is in the recording, and for what
share of the time (``tone_fraction``): "a packet arrived" is not audio, a 440 Hz sine heard
for most of the call is.

API:

* ``make_tone_wav(path, freq, seconds, rate=8000)``: a mono 16-bit sine WAV (amplitude -6 dBFS).
* ``dominant_frequency(samples, rate) -> float``: the strongest frequency of a block (Hz),
  from an FFT with a Hann window and parabolic peak interpolation; 0.0 for silence.
* ``tone_fraction(path_or_samples, freq, rate=None, tol_hz=20) -> float``: the fraction of
  20 ms frames in which ``freq`` (within ``tol_hz``) is present: the frame is not silent and
  the Goertzel energy at ``freq`` holds most of the frame's energy. ``rate`` is required for
  samples, read from the file for a path. Stereo files are mixed down to mono.
* ``read_mono(path) -> (samples, rate)``: float samples in [-1, 1].

Only numpy and soundfile (both runtime dependencies of softpbx) are used.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

FRAME_SECONDS = 0.02
"""Analysis frame (20 ms, one G.711 packet): short enough to see a gap, long enough for
Goertzel to separate 440 from 880 Hz."""

SILENCE_RMS = 0.003
"""Frames quieter than this (about -50 dBFS) count as silence, never as a tone."""

DOMINANCE = 0.5
"""Share of a frame's energy the tone must hold to count as present (G.711 quantisation noise
and a little of the other side's echo stay far below that)."""


def make_tone_wav(path: str | Path, freq: float, seconds: float, rate: int = 8000) -> Path:
    """Write a mono 16-bit PCM sine of ``freq`` Hz, ``seconds`` long, at -6 dBFS; returns the path."""
    path = Path(path)
    t = np.arange(int(seconds * rate)) / rate
    samples = 0.5 * np.sin(2 * np.pi * freq * t)
    sf.write(str(path), samples, rate, subtype="PCM_16")
    return path


def read_mono(path: str | Path) -> tuple[np.ndarray, int]:
    """Float samples of a sound file, mixed down to mono, and its rate."""
    data, rate = sf.read(str(path), dtype="float64", always_2d=True)
    return data.mean(axis=1), int(rate)


def dominant_frequency(samples: np.ndarray, rate: int) -> float:
    """The strongest frequency in ``samples`` (Hz), 0.0 when they are silent or empty."""
    x = np.asarray(samples, dtype="float64")
    if x.size < 4 or float(np.sqrt(np.mean(x * x))) < SILENCE_RMS:
        return 0.0
    spectrum = np.abs(np.fft.rfft((x - x.mean()) * np.hanning(x.size)))
    k = int(np.argmax(spectrum[1:])) + 1  # skip DC
    # Parabolic interpolation between the neighbouring bins: sub-bin accuracy on short blocks.
    if 1 <= k < spectrum.size - 1:
        a, b, c = spectrum[k - 1], spectrum[k], spectrum[k + 1]
        denom = a - 2 * b + c
        shift = 0.5 * (a - c) / denom if denom else 0.0
    else:
        shift = 0.0
    return float((k + shift) * rate / x.size)


def _goertzel_power(frame: np.ndarray, freq: float, rate: int) -> float:
    """Power of ``frame`` at ``freq`` (Goertzel), normalised so a full-frame sine of amplitude
    A gives about A**2 / 2, the same scale as the frame's mean square."""
    n = frame.size
    # Evaluate at the exact frequency (not the nearest bin): correlation with a complex sine.
    t = np.arange(n) / rate
    acc = np.dot(frame, np.exp(-2j * np.pi * freq * t))
    return float(2.0 * abs(acc) ** 2 / (n * n))


def tone_fraction(path_or_samples: str | Path | np.ndarray, freq: float, rate: int | None = None,
                  tol_hz: float = 20) -> float:
    """Fraction of 20 ms frames in which a tone of ``freq`` Hz (+- ``tol_hz``) is present.

    A frame counts when it is not silent and the tone holds at least ``DOMINANCE`` of its energy
    (best of ``freq - tol_hz``, ``freq``, ``freq + tol_hz`` in 5 Hz steps, so a resampled or
    slightly off tone still counts). 0.0 for an empty or missing recording's samples.
    """
    if isinstance(path_or_samples, (str, Path)):
        samples, file_rate = read_mono(path_or_samples)
        rate = rate or file_rate
    else:
        if rate is None:
            raise ValueError("tone_fraction: rate is required with raw samples")
        samples = np.asarray(path_or_samples, dtype="float64")
        if samples.ndim > 1:
            samples = samples.mean(axis=1)
    size = int(rate * FRAME_SECONDS)
    count = samples.size // size if size else 0
    if count == 0:
        return 0.0
    steps = max(1, int(tol_hz // 5))
    candidates = [freq + 5 * i for i in range(-steps, steps + 1)]
    present = 0
    for i in range(count):
        frame = samples[i * size:(i + 1) * size]
        frame = frame - frame.mean()
        energy = float(np.mean(frame * frame))
        if energy < SILENCE_RMS ** 2:
            continue
        best = max(_goertzel_power(frame, f, rate) for f in candidates)
        if best >= DOMINANCE * energy:
            present += 1
    return present / count
