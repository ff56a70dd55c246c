"""Streaming generation (minihiggs.generate.stream): the decoder's receptive field, the incremental delay-pattern
revert, chunked decoding against the offline decode, and a streamed generation end to end."""

from __future__ import annotations

import pytest
import torch

from helpers import LLAMA_DIR, TINY
from minihiggs import load_model
from minihiggs.data.batch import delay_pattern, revert_delay_pattern
from minihiggs.generate import Engine, Request, SamplingConfig, tts_prompt
from minihiggs.generate.loading import load_codec
from minihiggs.generate.stream import DelayReverter, StreamDecoder, receptive_field, stream_speech
from minihiggs.model.tiny import write_tiny_checkpoint
from minihiggs.text.tokenizer import TextTokenizer, write_higgs_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
# Same inputs, other window lengths: only float rounding differs (outputs have an RMS of ~0.1; seen: ~2e-7).
ATOL = 1e-5


@pytest.fixture(scope="module")
def codec(tmp_path_factory):
    from minihiggs.codec.tiny import write_random_decoder

    return load_codec(write_random_decoder(tmp_path_factory.mktemp("codec") / "codec"))


@pytest.fixture(scope="module")
def codes():
    return torch.randint(0, 1024, (8, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def offline(codec, codes):
    return codec.decode(codes)


def test_receptive_field_is_what_a_changed_frame_reaches(codec, codes, offline):
    """The analytic field (from the conv arithmetic) is exactly the span of output frames one input frame moves."""
    left, right = receptive_field(codec.decoder_2, codec.hop_length)
    f = 12
    changed = codes.clone()
    changed[:, f] = (changed[:, f] + 1) % 1024
    diff = (codec.decode(changed) - offline).abs().view(-1, codec.hop_length).amax(dim=1)
    moved = torch.nonzero(diff > 0).squeeze(1)
    assert (int(moved.min()), int(moved.max())) == (f - right, f + left)


def _stream(codec, codes, pieces: int, **kw) -> tuple[torch.Tensor, list[int]]:
    dec = StreamDecoder(codec, **kw)
    out = []
    for s in range(0, codes.shape[1], pieces):
        out += dec.push(codes[:, s:s + pieces])
    out += dec.finish()
    return torch.cat(out), [len(c) // codec.hop_length for c in out]


@pytest.mark.parametrize("chunk,first,pieces", [(1, 1, 1), (4, 2, 3), (7, 3, 5), (30, 5, 24)])
def test_stream_equals_the_offline_decode_when_the_context_covers_the_field(codec, codes, offline, chunk, first,
                                                                            pieces):
    wave, sizes = _stream(codec, codes, pieces, chunk=chunk, first_chunk=first)
    assert sizes[0] == min(first, codes.shape[1]) and all(s <= chunk for s in sizes[1:]) and sum(sizes) == 24
    torch.testing.assert_close(wave, offline, rtol=0, atol=ATOL)


def test_a_short_context_only_changes_samples_near_chunk_boundaries(codec, codes, offline):
    """With context c < the field, only samples within (field - c) frames of a boundary can differ."""
    left, right = receptive_field(codec.decoder_2, codec.hop_length)
    ctx, chunk = 4, 8
    wave, sizes = _stream(codec, codes, 24, chunk=chunk, first_chunk=chunk, left=ctx, right=ctx)
    err = (wave - offline).abs().view(-1, codec.hop_length).amax(dim=1)
    boundaries = [8, 16]
    near = torch.zeros(24, dtype=torch.bool)
    for b in boundaries:
        near[max(0, b - (right - ctx)):b + (left - ctx)] = True
    assert float(err[~near].max()) <= ATOL
    assert float(err[near].max()) > 100 * ATOL  # the bound is not vacuous: the short context does change those


def test_crossfade_blends_the_seam(codec, codes, offline):
    hard, _ = _stream(codec, codes, 24, chunk=8, first_chunk=8, left=2, right=2)
    soft, _ = _stream(codec, codes, 24, chunk=8, first_chunk=8, left=2, right=2, crossfade=960)
    seam = slice(8 * 960, 9 * 960)
    assert not torch.equal(hard[seam], soft[seam])
    torch.testing.assert_close(soft[:8 * 960], hard[:8 * 960], rtol=0, atol=0)  # the first chunk has no seam
    with pytest.raises(ValueError, match="crossfade"):
        StreamDecoder(codec, chunk=8, left=2, right=2, crossfade=3 * 960)


def _segment(codes: torch.Tensor) -> torch.Tensor:
    """A generated segment's columns: [BOS, codes, EOS] with the delay pattern (what the engine emits)."""
    k = codes.shape[0]
    cols = torch.cat([torch.full((k, 1), 1024), codes, torch.full((k, 1), 1025)], dim=1)
    return delay_pattern(cols, 1024, 1025)


@pytest.mark.parametrize("cut", [None, 12, 9, 3])
def test_delay_reverter_gives_the_served_frames(cut):
    """Column by column, the frames of `Generation.segment_codes` (also for a segment cut short)."""
    g = torch.Generator().manual_seed(1)
    segs = [_segment(torch.randint(0, 1024, (8, n), generator=g)) for n in (6, 4)]
    if cut is not None:
        segs[1] = segs[1][:, :cut]
    rev, got = DelayReverter(8, 1024), []
    for seg in segs:
        rev.reset()
        got += [f for c in seg.unbind(1) if (f := rev.push(c)) is not None]
    want = torch.cat([revert_delay_pattern(s).clip(0, 1023)[:, 1:-1] for s in segs], dim=1)
    assert torch.equal(torch.stack(got, dim=1) if got else torch.zeros(8, 0, dtype=torch.long), want)


def test_streamed_generation_equals_generate_then_decode(codec, tmp_path):
    base = write_tiny_checkpoint(tmp_path / "base", seed=0, **TINY)
    write_higgs_tokenizer(LLAMA_DIR, base)
    tok = TextTokenizer.from_dir(base)
    engine = Engine(load_model(base))
    req = Request(tts_prompt(tok, "Hello there."), SamplingConfig(temperature=0.7, seed=3), 22)
    [gen] = engine.generate([req])
    assert gen.frames > 5
    chunks = list(stream_speech(engine, req, codec, chunk=4, first_chunk=2))
    assert len(chunks[0]) == 2 * codec.hop_length and len(chunks) >= 3
    torch.testing.assert_close(torch.cat(chunks), codec.decode(gen.codes()), rtol=0, atol=ATOL)
