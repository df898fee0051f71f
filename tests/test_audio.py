"""The audio pipeline on real signals: decoding, resampling, windows, and its errors."""

import numpy as np
import pytest
from helpers import chirp, noise, tone

from clap_ws.audio import AudioSpec, decode_pcm, load, window_starts, windows
from clap_ws.constants import WINDOW_SAMPLES
from clap_ws.errors import AudioError, ErrorCode
from clap_ws.model.towers import int16_round_trip as quantize


def dominant_hz(x: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / sr)[spectrum.argmax()])


def test_440hz_at_22050_comes_out_at_440hz_at_48k():
    out = load(tone(440, sr=22050, seconds=2).tobytes(), AudioSpec(sample_rate=22050), 60)
    assert len(out) == 96000
    assert abs(dominant_hz(out, 48000) - 440) < 1.0
    assert 0.45 < np.abs(out[1000:-1000]).max() < 0.55  # amplitude kept, no normalisation


@pytest.mark.parametrize("rate", [8000, 11025, 16000, 44100, 96000, 192000])
def test_any_rate_in_range_is_resampled_to_48k(rate):
    out = load(tone(1000, sr=rate, seconds=1).tobytes(), AudioSpec(sample_rate=rate), 60)
    assert abs(len(out) - 48000) <= 1
    assert abs(dominant_hz(out, 48000) - 1000) < 2.0


def test_48k_input_is_not_resampled_or_copied():
    x = noise(seconds=1)
    data = bytearray(x.tobytes())
    out = load(data, AudioSpec(), 60)
    assert np.array_equal(out, x)
    assert np.shares_memory(out, np.frombuffer(data, np.float32))  # a view of the frame's own bytes
    data[:4] = np.float32(0.25).tobytes()
    assert out[0] == np.float32(0.25)  # ... as a write into the frame shows


def test_interleaved_channels_are_averaged():
    left, right = tone(440, seconds=1), chirp(seconds=1)
    stereo = np.stack([left, right], axis=1).reshape(-1)
    out = load(stereo.tobytes(), AudioSpec(channels=2), 60)
    np.testing.assert_allclose(out, (left + right) / 2, atol=1e-7)


def test_peak_normalisation_only_when_asked():
    quiet = tone(440, seconds=1, amp=0.1)
    assert np.abs(load(quiet.tobytes(), AudioSpec(), 60)).max() == pytest.approx(0.1, abs=1e-3)
    assert np.abs(load(quiet.tobytes(), AudioSpec(normalize="peak"), 60)).max() == pytest.approx(1.0)


@pytest.mark.parametrize("data, channels, code, words", [
    (b"", 1, "bad_audio", "empty"),
    (b"\x00" * 6, 1, "bad_audio", "multiple of 4"),
    (b"\x00" * 12, 2, "bad_audio", "multiple of 8"),
    (np.array([0.1, np.nan], np.float32).tobytes(), 1, "bad_audio", "NaN"),
    (np.array([0.1, np.inf], np.float32).tobytes(), 1, "bad_audio", "infinite"),
])
def test_bad_buffers_are_refused_with_a_reason(data, channels, code, words):
    with pytest.raises(AudioError, match=words) as info:
        load(data, AudioSpec(channels=channels), 60)
    assert info.value.code == code


@pytest.mark.parametrize("rate", [7999, 192001, 0, -48000])
def test_rate_out_of_range(rate):
    with pytest.raises(AudioError, match="out of range") as info:
        load(tone(seconds=0.1).tobytes(), AudioSpec(sample_rate=rate), 60)
    assert info.value.code == ErrorCode.BAD_SAMPLE_RATE


def test_too_long_is_refused_before_resampling():
    with pytest.raises(AudioError, match="at most 5 s") as info:
        load(noise(sr=16000, seconds=6).tobytes(), AudioSpec(sample_rate=16000), 5)
    assert info.value.code == ErrorCode.TOO_LONG


def test_decode_is_little_endian_float32():
    x = np.array([0.25, -0.5], dtype=">f4")  # big-endian bytes decode to garbage
    assert not np.allclose(decode_pcm(x.tobytes()).ravel(), [0.25, -0.5])
    assert np.allclose(decode_pcm(x.astype("<f4").tobytes()).ravel(), [0.25, -0.5])


def test_short_clip_is_repeat_padded_like_laion_clap_and_quantised_by_laion_models():
    clip = tone(seconds=3)
    (w,) = windows(clip)
    assert w.shape == (WINDOW_SAMPLES,)
    np.testing.assert_array_equal(w[:144000], clip)
    np.testing.assert_array_equal(w[144000:288000], clip)  # three whole repeats fit in 10 s
    np.testing.assert_array_equal(w[432000:], 0)
    q = quantize(clip)
    assert np.array_equal(q, (np.clip(clip, -1, 1) * 32767).astype(np.int16) / np.float32(32767))
    np.testing.assert_array_equal(quantize(w)[:144000], q)  # quantising the window is quantising the clip


def test_exact_ten_seconds_is_one_window_unpadded():
    clip = noise(seconds=10)
    out = windows(clip)
    assert out.shape == (1, WINDOW_SAMPLES)
    np.testing.assert_array_equal(out[0], clip)


def test_long_clip_windows_cover_everything_deterministically():
    n = int(48000 * 25.5)
    assert window_starts(n, "mean") == [0, 480000, n - 480000]
    assert window_starts(n, "head") == [0]
    assert window_starts(n, "center") == [(n - 480000) // 2]
    assert window_starts(960000, "mean") == [0, 480000]
    clip = chirp(seconds=25.5)
    a, b = windows(clip, "mean"), windows(clip, "mean")
    assert a.shape == (3, WINDOW_SAMPLES) and np.array_equal(a, b)
    np.testing.assert_array_equal(a[2], clip[-WINDOW_SAMPLES:])
