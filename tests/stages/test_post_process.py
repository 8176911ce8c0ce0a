"""stages/audio.py's post-processing on synthetic signals: tones with silence and noise around them."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bark_serve.stages.audio import (
    LIMIT_CEILING,
    PEAK_CEILING,
    PostProcess,
    SegmentJoiner,
    join_segments,
    limit,
    loudness_gain,
    loudness_lufs,
    time_stretch,
    trim_silence,
)

SR = 24_000
RNG = np.random.default_rng(0)


def tone(seconds: float, freq: float = 220.0, amp: float = 0.3, phase: float = 0.0) -> np.ndarray:
    t = np.arange(int(SR * seconds)) / SR
    return (amp * np.sin(2 * np.pi * freq * t + phase)).astype(np.float32)


def noise(seconds: float, db: float) -> np.ndarray:
    return (RNG.standard_normal(int(SR * seconds)) * 10 ** (db / 20)).astype(np.float32)


def padded(core: np.ndarray, before: float = 0.3, after: float = 0.4, noise_db: float = -65.0) -> np.ndarray:
    """A segment as Bark makes them: quiet noise, the sound, quiet noise."""
    return np.concatenate([noise(before, noise_db), core, noise(after, noise_db)])


def dominant_hz(audio: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    return float(np.fft.rfftfreq(len(audio), 1 / SR)[np.argmax(spectrum)])


# -- trimming --------------------------------------------------------------------------------------------------
def test_trim_cuts_leading_and_trailing_noise_down_to_the_margin():
    core = tone(0.5)
    out = trim_silence(padded(core), SR, threshold_db=-40, margin_ms=40)
    frame, margin = SR // 100, int(SR * 0.04)
    assert abs(len(out) - (len(core) + 2 * margin)) <= 2 * frame
    assert np.max(np.abs(out[margin + frame:margin + len(core) - frame])) > 0.29  # the tone is all there


def test_trim_threshold_is_relative_to_the_segment():
    quiet = padded(tone(0.5, amp=0.003), noise_db=-85)  # the same shape, 40 dB down: trimmed the same
    loud = padded(tone(0.5, amp=0.3), noise_db=-45)
    assert abs(len(trim_silence(quiet, SR)) - len(trim_silence(loud, SR))) <= SR // 100
    # a threshold below the noise floor keeps the noise: nothing is cut
    assert len(trim_silence(loud, SR, threshold_db=-70)) == len(loud)


def test_trim_of_silence_and_of_nothing():
    assert len(trim_silence(np.zeros(SR, np.float32), SR)) == 0
    assert len(trim_silence(np.zeros(0, np.float32), SR)) == 0
    short = tone(0.003)  # shorter than one frame
    assert len(trim_silence(short, SR)) == len(short)


# -- crossfade ---------------------------------------------------------------------------------------------------
def test_crossfade_leaves_no_step_at_the_seam():
    a, b = tone(0.3, 200, 0.5), tone(0.3, 330, 0.5, phase=np.pi / 2)  # b starts at its peak: a hard cut steps
    options = PostProcess(trim_silence=False, normalize_loudness=False, crossfade_ms=20)
    joined = join_segments([a, b], SR, options)
    fade = int(SR * 0.02)
    assert len(joined) == len(a) + len(b) - fade
    seam = slice(len(a) - fade - 50, len(a) + 50)
    smooth = np.max(np.abs(np.diff(joined[seam])))
    within = max(np.max(np.abs(np.diff(a))), np.max(np.abs(np.diff(b))))
    assert smooth <= within * 1.5  # equal-power: the mix may swell by up to 3 dB, never jump
    plain = np.concatenate([a, b])
    assert np.abs(np.diff(plain))[len(a) - 1] > 10 * within  # without the fade there is a step
    np.testing.assert_array_equal(joined[:len(a) - fade], a[:len(a) - fade])  # outside the fade: untouched
    np.testing.assert_array_equal(joined[len(a):], b[fade:])


def test_streamed_pushes_equal_the_whole_join_and_hold_back_only_the_fade():
    segments = [padded(tone(0.4, f)) for f in (180, 240, 300)]
    options = PostProcess()  # every default: trim, 20 ms crossfade, loudness
    joiner = SegmentJoiner(SR, options)
    pieces = [joiner.push(s) for s in segments]
    pieces.append(joiner.finish())
    assert len(pieces[-1]) == int(SR * options.crossfade_ms / 1000)
    assert all(len(p) > 0.3 * SR for p in pieces[:-1])  # each segment's audio is out at its push
    np.testing.assert_array_equal(np.concatenate(pieces), join_segments(segments, SR, options))


def test_raw_output_is_the_models_samples():
    segments = [padded(tone(0.2)), noise(0.1, -20), np.zeros(0, np.float32)]
    np.testing.assert_array_equal(join_segments(segments, SR, PostProcess.raw()), np.concatenate(segments))
    joiner = SegmentJoiner(SR, PostProcess.raw())
    assert [len(joiner.push(s)) for s in segments] == [len(s) for s in segments] and len(joiner.finish()) == 0


def test_short_and_empty_segments_join():
    options = PostProcess(trim_silence=False, normalize_loudness=False, crossfade_ms=20)
    parts = [tone(0.005), np.zeros(0, np.float32), tone(0.1), tone(0.001)]
    joined = join_segments(parts, SR, options)
    assert 0 < len(joined) <= sum(len(p) for p in parts)
    assert np.all(np.isfinite(joined))


# -- loudness ----------------------------------------------------------------------------------------------------
# The reference these tests measure against is not the code's own meter (loudness_lufs, which also picks the
# gain, so an error in it would cancel out): BS.1770 calibrates its K-weighting so that a full-scale 997 Hz sine,
# mono, reads -3.01 LUFS, so a 997 Hz sine of peak A reads 20 log10(A) - 3.01 LUFS.
CAL_HZ = 997.0


def sine_lufs(peak: float) -> float:
    return 20 * math.log10(peak) - 3.01


def gain_of(out: np.ndarray, x: np.ndarray) -> float:
    """The one linear gain that made ``out`` from ``x`` (least squares; asserted to be a pure gain)."""
    x64, out64 = x.astype(np.float64), out.astype(np.float64)
    g = float(np.dot(out64, x64) / np.dot(x64, x64))
    np.testing.assert_allclose(out64, g * x64, atol=1e-5 * max(g, 1.0))
    return g


@pytest.mark.parametrize("amp", [0.01, 0.05, 0.3])
def test_loudness_reaches_the_target(amp):
    x = tone(1.0, CAL_HZ, amp=amp)
    out = join_segments([x], SR, PostProcess(trim_silence=False, target_lufs=-20.0))
    assert sine_lufs(amp * gain_of(out, x)) == pytest.approx(-20.0, abs=0.2)
    assert loudness_lufs(x, SR) == pytest.approx(sine_lufs(amp), abs=0.1)  # the meter itself, calibrated


def test_one_gain_per_request_keeps_the_segments_relative_levels():
    first, second = tone(1.0, CAL_HZ, amp=0.02), tone(1.0, CAL_HZ, amp=0.04)  # +6 dB
    out = join_segments([first, second], SR, PostProcess(trim_silence=False, crossfade_ms=0, target_lufs=-24.0))
    a, b = out[:len(first)], out[len(first):]
    # the first segment sets the request's one gain (a stream cannot wait for the rest), the second keeps +6 dB
    g = gain_of(a, first)
    assert gain_of(b, second) == pytest.approx(g, rel=1e-6)
    assert sine_lufs(0.02 * g) == pytest.approx(-24.0, abs=0.2)
    assert loudness_lufs(b, SR) - loudness_lufs(a, SR) == pytest.approx(6.02, abs=0.2)


def test_gain_never_pushes_the_peak_over_minus_one_dbfs():
    clicks = np.zeros(SR, np.float32)
    clicks[::2400] = 0.5  # very peaky, very quiet on average: the target gain would clip
    gain = loudness_gain(clicks, SR, target_lufs=-14.0, max_gain_db=40.0)
    assert gain is not None and np.max(np.abs(clicks * gain)) <= 10 ** (-1 / 20) + 1e-6


def test_silence_and_near_silence_are_not_amplified():
    assert loudness_gain(np.zeros(SR, np.float32), SR, -18, 30) is None
    hiss = noise(1.0, -95)
    assert loudness_gain(hiss, SR, -18, 30) is None
    out = join_segments([hiss], SR, PostProcess(trim_silence=False))
    np.testing.assert_array_equal(out, hiss)


def test_short_segments_are_measured_looped():
    assert loudness_lufs(tone(0.1, CAL_HZ), SR) == pytest.approx(sine_lufs(0.3), abs=0.5)


# -- speed -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("speed", [0.25, 0.5, 2.0, 4.0])
def test_speed_changes_duration_not_pitch(speed):
    x = tone(1.2, 220)
    out = time_stretch(x, SR, speed)
    assert len(out) == pytest.approx(len(x) / speed, rel=0.02)
    middle = out[len(out) // 4: 3 * len(out) // 4]
    assert dominant_hz(middle) == pytest.approx(220, abs=8)


def test_speed_two_halves_a_joined_request():
    segments = [padded(tone(0.6, f)) for f in (200, 260)]
    normal = join_segments(segments, SR, PostProcess(crossfade_ms=0))
    fast = join_segments(segments, SR, PostProcess(crossfade_ms=0, speed=2.0))
    assert len(fast) == pytest.approx(len(normal) / 2, rel=0.03)


def test_nan_and_inf_samples_are_silence_and_full_scale_and_finite_audio_is_untouched():
    """NaN would defeat the trim (no frame compares loud) and infinities the gain."""
    bad = tone(0.5)
    bad[100:200], bad[300], bad[400] = np.nan, np.inf, -np.inf
    joined = join_segments([bad, tone(0.5)], SR, PostProcess())
    assert joined.size and np.all(np.isfinite(joined))
    clean = bad.copy()
    clean[100:200], clean[300], clean[400] = 0.0, 1.0, -1.0
    np.testing.assert_array_equal(joined, join_segments([clean, tone(0.5)], SR, PostProcess()))
    finite = [tone(0.4, amp=0.2), RNG.standard_normal(9000).astype(np.float32) * 0.1]
    before = [s.copy() for s in finite]
    again = join_segments(finite, SR, PostProcess())
    assert all(np.array_equal(a, b) for a, b in zip(finite, before))  # inputs not modified
    np.testing.assert_array_equal(again, join_segments(before, SR, PostProcess()))


def test_nothing_goes_over_full_scale_after_a_loud_seam_and_quiet_audio_is_untouched():
    """Issue 25: an equal-power crossfade of two segments at -1 dBFS swelled to -1.03 (over full scale) after
    the loudness gain; the limiter keeps every sample under -0.1 dBFS, streamed or whole alike."""
    loud = PEAK_CEILING
    a, b = tone(0.3, 200, loud), tone(0.3, 200, loud)  # in phase at the seam: the mix swells by up to 3 dB
    options = PostProcess(trim_silence=False, normalize_loudness=False, crossfade_ms=20)
    plain_mix = a[-960:] * np.cos((np.arange(960) + 0.5) / 960 * np.pi / 2) + \
        b[:960] * np.sin((np.arange(960) + 0.5) / 960 * np.pi / 2)
    assert np.max(np.abs(plain_mix)) > 1.0  # what went out before
    joined = join_segments([a, b], SR, options)
    assert np.max(np.abs(joined)) < LIMIT_CEILING < 1.0
    joiner = SegmentJoiner(SR, options)
    streamed = np.concatenate([joiner.push(a), joiner.push(b), joiner.finish()])
    np.testing.assert_array_equal(streamed, joined)
    quiet = tone(0.3, 200, 0.5)
    np.testing.assert_array_equal(limit(quiet), quiet)  # under -1 dBFS: bit for bit
    hot = np.array([-4.0, -1.0, -0.95, 0.5, 0.95, 1.0, 4.0], np.float32)
    out = limit(hot)
    assert np.all(np.abs(out) < LIMIT_CEILING) and np.all(np.diff(out) > 0) and out[3] == hot[3]
