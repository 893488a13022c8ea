"""Audio the ``softpbx demo`` parties play, as 8 kHz mu-law (PCMU) bytes.

Each party has its own sound so a stereo recording (caller left, callee right) shows who
said what: spoken words when ``espeak-ng`` is installed (made at run time, nothing shipped),
otherwise a short melody per party. Either is made once per run and looped by the sender.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import tempfile

import numpy as np

from .media.g711 import ulaw_encode

log = logging.getLogger("softpbx.demo")

RATE = 8000
"""G.711 sample rate."""

# Note frequencies (Hz) per party: distinct registers, so each side is easy to tell apart.
MELODIES: dict[str, tuple[float, ...]] = {
    "carrier": (523.25, 659.25, 783.99, 1046.5),   # C5 E5 G5 C6, rising
    "101": (392.0, 329.63, 261.63),                # G4 E4 C4, falling
    "102": (440.0, 554.37, 440.0, 659.25),         # A4 C#5 A4 E5
}
PHRASES: dict[str, str] = {
    "carrier": "Hello, this is the carrier. The customer is on the line.",
    "101": "Hello, Alice at extension one oh one speaking.",
    "102": "Hi, this is Bob at extension one oh two.",
}
ESPEAK_TIMEOUT_S = 10.0


def melody(party: str, *, note_s: float = 0.25, gap_s: float = 0.08,
           pause_s: float = 0.6) -> np.ndarray:
    """One phrase of ``party``'s melody (int16 PCM at 8 kHz), ending in a pause."""
    notes = MELODIES.get(party, MELODIES["101"])
    t = np.arange(int(note_s * RATE)) / RATE
    # A short fade in/out per note: no clicks at the note boundaries.
    env = np.minimum(1.0, np.minimum(t, note_s - t) / 0.01)
    parts: list[np.ndarray] = []
    for f in notes:
        tone = 0.6 * np.sin(2 * np.pi * f * t) + 0.2 * np.sin(4 * np.pi * f * t)
        parts += [tone * env, np.zeros(int(gap_s * RATE))]
    parts.append(np.zeros(int(pause_s * RATE)))
    return (np.concatenate(parts) * 12000).astype(np.int16)


def speech(text: str) -> np.ndarray | None:
    """``text`` spoken by espeak-ng (int16 PCM at 8 kHz), or ``None`` when espeak-ng is not
    installed or fails (the caller falls back to a melody)."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        return None
    import soundfile  # a dependency of the package (the MP3 encoder); imported only here

    fd, path = tempfile.mkstemp(suffix=".wav", prefix="softpbx-demo-")
    os.close(fd)
    try:
        subprocess.run([exe, "-w", path, "-s", "150", text], check=True, timeout=ESPEAK_TIMEOUT_S,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        data, rate = soundfile.read(path, dtype="float64", always_2d=True)
    except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
        log.warning("espeak-ng failed (%s): playing a melody instead", exc)
        return None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
    mono = data.mean(axis=1)
    if not len(mono):
        return None
    # espeak-ng writes 22050 Hz: linear interpolation to 8 kHz is plenty for a phone line.
    n_out = int(len(mono) * RATE / rate)
    resampled = np.interp(np.arange(n_out) * rate / RATE, np.arange(len(mono)), mono)
    peak = float(np.max(np.abs(resampled))) or 1.0
    pcm = resampled / peak * 16000
    return np.concatenate([pcm, np.zeros(int(0.7 * RATE))]).astype(np.int16)


def party_audio(party: str, *, use_speech: bool = True) -> tuple[bytes, str]:
    """(PCMU bytes, what it is) for ``party`` ("carrier", "101", "102")."""
    if use_speech:
        pcm = speech(PHRASES.get(party, f"This is {party}."))
        if pcm is not None:
            return ulaw_encode(pcm), "espeak-ng speech"
    return ulaw_encode(melody(party)), "melody"
