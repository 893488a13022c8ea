"""Mp3Writer and recover_partials: real files in a temporary directory, decoded with soundfile."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from softpbx.media.mp3 import PART_SUFFIX, Mp3Writer, recover_partials

RATE = 8000


def tone(freq: float, seconds: float, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (amplitude * 32767 * np.sin(2 * np.pi * freq * t)).astype(np.int16)


def peak_hz(signal: np.ndarray) -> float:
    """Frequency of the strongest FFT bin (1 s Hann window from 1 s in: past encoder start-up)."""
    part = signal[RATE : 2 * RATE]
    spectrum = np.abs(np.fft.rfft(part * np.hanning(len(part))))
    return float(np.argmax(spectrum) * RATE / len(part))


def band_energy(signal: np.ndarray, freq: float) -> float:
    part = signal[RATE : 2 * RATE]
    spectrum = np.abs(np.fft.rfft(part * np.hanning(len(part))))
    bin_ = int(freq * len(part) / RATE)
    return float(spectrum[bin_ - 3 : bin_ + 4].max())


def test_mono_tone_in_three_chunks(tmp_path: Path) -> None:
    final = tmp_path / "rec" / "call.mp3"  # the directory is created
    pcm = tone(440, 3.0)
    writer = Mp3Writer(final, channels=1, compression_level=0.5)
    for i in range(3):
        writer.write(pcm[i * RATE : (i + 1) * RATE])
        assert Path(writer.part_path).exists()
        assert not final.exists()
    result = writer.close()
    assert result.path == str(final)
    assert final.exists() and not Path(str(final) + PART_SUFFIX).exists()
    assert result.size_bytes == final.stat().st_size > 0
    assert result.duration_seconds == pytest.approx(3.0)
    decoded, rate = sf.read(final, dtype="int16")
    assert rate == RATE and decoded.ndim == 1
    assert abs(len(decoded) / RATE - 3.0) <= 0.1
    assert peak_hz(decoded) == pytest.approx(440, abs=2)


def test_stereo_keeps_channels_apart(tmp_path: Path) -> None:
    final = tmp_path / "stereo.mp3"
    pcm = np.column_stack((tone(440, 3.0), tone(880, 3.0)))
    with Mp3Writer(final, channels=2) as writer:
        for i in range(3):
            writer.write(pcm[i * RATE : (i + 1) * RATE])
        result = writer.close()
    assert result.duration_seconds == pytest.approx(3.0)
    decoded, _ = sf.read(final, dtype="int16")
    assert decoded.shape[1] == 2 and abs(len(decoded) / RATE - 3.0) <= 0.1
    left, right = decoded[:, 0].astype(float), decoded[:, 1].astype(float)
    assert peak_hz(left) == pytest.approx(440, abs=2)
    assert peak_hz(right) == pytest.approx(880, abs=2)
    assert band_energy(left, 880) < 0.05 * band_energy(left, 440)
    assert band_energy(right, 440) < 0.05 * band_energy(right, 880)
    # Full level survives (libsndfile's int16 stereo path would halve it; we write int32).
    assert np.abs(decoded[RATE : 2 * RATE]).max() > 0.25 * 32767


def test_abort_leaves_nothing(tmp_path: Path) -> None:
    final = tmp_path / "gone.mp3"
    writer = Mp3Writer(final, channels=2)
    writer.write(np.zeros((RATE, 2), np.int16))
    writer.abort()
    writer.abort()  # idempotent
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError):
        writer.write(np.zeros((10, 2), np.int16))


def test_context_manager_aborts_on_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), Mp3Writer(tmp_path / "x.mp3", channels=1) as writer:
        writer.write(tone(440, 0.5))
        raise RuntimeError("call torn down")
    assert list(tmp_path.iterdir()) == []


def test_empty_recording_is_still_a_valid_mp3(tmp_path: Path) -> None:
    result = Mp3Writer(tmp_path / "empty.mp3", channels=1).close()
    assert result.duration_seconds < 0.01
    info = sf.info(result.path)
    assert info.format == "MP3"


def test_rejects_wrong_shapes_and_types(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        Mp3Writer(tmp_path / "a.mp3", channels=3)
    with pytest.raises(ValueError):
        Mp3Writer(tmp_path / "a.mp3", channels=1, compression_level=1.5)
    with Mp3Writer(tmp_path / "b.mp3", channels=2) as writer:
        with pytest.raises(ValueError):
            writer.write(np.zeros(10, np.int16))
        with pytest.raises(TypeError):
            writer.write(np.zeros((10, 2), np.float32))
    with Mp3Writer(tmp_path / "c.mp3", channels=1, compression_level=1.0) as writer:
        writer.write(tone(440, 0.2))
        assert writer.close().size_bytes > 0


def test_recover_partials(tmp_path: Path) -> None:
    # A crash mid-call: copy the .part as it is on disk while still being written.
    writer = Mp3Writer(tmp_path / "live.mp3", channels=1)
    writer.write(tone(440, 1.0))
    writer.write(tone(440, 1.0))
    crashed = tmp_path / "crashed.mp3.part"
    shutil.copy(writer.part_path, crashed)
    writer.abort()
    (tmp_path / "junk.mp3.part").write_bytes(os.urandom(3000))
    (tmp_path / "empty.mp3.part").write_bytes(b"")
    done = Mp3Writer(tmp_path / "done.mp3", channels=1)
    done.write(tone(440, 0.5))
    done.close()
    shutil.copy(tmp_path / "done.mp3", tmp_path / "done.mp3.part")  # renamed, then crashed

    results = {Path(r.part_path).name: r for r in recover_partials(tmp_path)}

    assert set(results) == {"crashed.mp3.part", "junk.mp3.part", "empty.mp3.part", "done.mp3.part"}
    recovered = results["crashed.mp3.part"]
    assert recovered.finalised and recovered.path == str(tmp_path / "crashed.mp3")
    assert 1.5 < recovered.duration_seconds <= 2.0
    assert recovered.size_bytes == (tmp_path / "crashed.mp3").stat().st_size
    decoded, _ = sf.read(tmp_path / "crashed.mp3", dtype="int16")
    assert peak_hz(decoded) == pytest.approx(440, abs=2)
    for name in ("junk.mp3.part", "empty.mp3.part", "done.mp3.part"):
        assert not results[name].finalised and results[name].reason
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crashed.mp3", "done.mp3"]
    assert recover_partials(tmp_path) == []
    assert recover_partials(tmp_path / "missing") == []


@pytest.mark.parametrize("mode", ["CONSTANT", "VARIABLE"])
def test_vbr_header_repair_leaves_complete_files_alone(tmp_path, mode: str) -> None:
    import numpy as np

    from softpbx.media.mp3 import Mp3Writer, _repair_vbr_header

    t = np.arange(16000) / 8000
    pcm = (8000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
    w = Mp3Writer(tmp_path / "ok.mp3", channels=1, bitrate_mode=mode, fsync=False)
    w.write(pcm)
    done = w.close()
    before = (tmp_path / "ok.mp3").read_bytes()
    _repair_vbr_header(done.path)
    assert (tmp_path / "ok.mp3").read_bytes() == before
