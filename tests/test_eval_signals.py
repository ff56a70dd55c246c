"""The cheap signals: silence, a clip that never stops and a correct clip are flagged (or not) as they should be,
and the ratios are those worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minihiggs.eval.signals import cheap_signals, flags, repeated_frame_ratio, silence_ratios

SR = 16000


def tone(seconds: float, amp: float = 0.3, f0: float = 180.0) -> np.ndarray:
    t = np.arange(round(seconds * SR)) / SR
    return (amp * np.sin(2 * np.pi * f0 * t) * (1.2 + np.sin(2 * np.pi * 4 * t))).astype(np.float32)


def quiet(seconds: float) -> np.ndarray:
    return np.random.default_rng(0).normal(0, 1e-4, round(seconds * SR)).astype(np.float32)  # -80 dBFS hiss


def test_silence_is_flagged():
    s = cheap_signals(quiet(2.0), SR, truth_seconds=2.0, stop_reason="stop_token",
                      codes=torch.full((8, 50), 7))
    assert s.silence.leading == 1.0 and s.silence.total == 1.0
    assert "silent" in flags(s) and "repetitive" in flags(s)
    assert "silent" in flags(cheap_signals(np.zeros(SR, np.float32), SR))


def test_a_clip_that_never_stops_is_flagged():
    wave = np.concatenate([tone(1.0), tone(19.0, f0=220)])
    s = cheap_signals(wave, SR, truth_seconds=3.0, stop_reason="max_new_tokens",
                      codes=torch.randint(0, 1024, (8, 500), generator=torch.Generator().manual_seed(0)))
    assert s.stop_reason == "length" and s.duration_ratio == pytest.approx(20 / 3)
    assert set(flags(s)) == {"no_eos", "too_long"}


def test_a_correct_clip_is_not_flagged():
    wave = np.concatenate([quiet(0.1), tone(1.3), quiet(0.2), tone(1.3), quiet(0.1)])  # a 200 ms pause inside
    s = cheap_signals(wave, SR, truth_seconds=2.8, stop_reason="stop_token",
                      codes=torch.randint(0, 1024, (8, 75), generator=torch.Generator().manual_seed(1)))
    assert s.stop_reason == "eos" and s.silence.inner == 0.0
    assert flags(s) == []
    # the same clip 20 dB quieter is still speech (the threshold follows the clip's level down to -60 dBFS)
    assert flags(cheap_signals(wave * 0.1, SR, truth_seconds=2.8, stop_reason="stop_token")) == []


def test_silence_ratios_by_hand():
    # 1 s silence, 2 s voice, 0.5 s pause, 1 s voice, 0.5 s silence: 5 s, all on 20 ms frame boundaries
    wave = np.concatenate([quiet(1.0), tone(2.0), quiet(0.5), tone(1.0), quiet(0.5)])
    s = silence_ratios(wave, SR)
    assert (s.leading, s.inner, s.trailing) == pytest.approx((0.2, 0.1, 0.1), abs=1e-9)
    assert silence_ratios(np.concatenate([tone(1.0), quiet(3.0)]), SR).trailing == pytest.approx(0.75)
    # a noise floor above -60 dBFS is still silence next to speech 40 dB louder (the relative threshold)
    hiss = np.random.default_rng(1).normal(0, 3e-3, SR).astype(np.float32)  # about -50 dBFS
    assert silence_ratios(np.concatenate([hiss, tone(3.0) + hiss[0]]), SR).leading == pytest.approx(0.25)


def test_edge_silence_and_short_clips_are_flagged():
    lead = cheap_signals(np.concatenate([quiet(2.0), tone(1.0)]), SR, truth_seconds=3.0)
    assert flags(lead) == ["leading_silence"]
    short = cheap_signals(tone(1.0), SR, truth_seconds=3.0)
    assert flags(short) == ["too_short"]


def test_repeated_frame_ratio_by_hand():
    codes = torch.tensor([[1, 1, 2, 2, 2], [3, 3, 4, 5, 5]])  # frames (1,3) (1,3) (2,4) (2,5) (2,5)
    assert repeated_frame_ratio(codes) == pytest.approx(2 / 4)
    assert repeated_frame_ratio(codes[:, :1]) == 0.0
