"""torch.compile without recompiles: the compiled decoder layers trace each layer signature once per shape bucket,
whatever the text/audio mix of the batches (the DualFFN routing lists are dynamic sizes).

The compiler backend here is `aot_eager` (dynamo + AOTAutograd, forward and backward graphs, no code generation):
recompiles are decided by dynamo's guards, which are the same under inductor, and the test stays quick on 2 cores.
"""

from __future__ import annotations

import random

import pytest
import torch

from minihiggs import HiggsConfig, collate
from minihiggs.data.batch import collate_rows
from minihiggs.lora.apply import apply_lora
from minihiggs.model.higgs import HiggsAudioModel
from minihiggs.model.tiny import tiny_config
from synth import synth_sample

pytestmark = pytest.mark.usefixtures("one_thread")

ROW = 256  # the fixed packed-row length (the trainer pads packed rows to --max_tokens_per_batch under compile)


def varied_samples(g: torch.Generator, rng: random.Random) -> list:
    """1-3 samples: short or long text, with or without reference audio, short or long audio-out, text turns."""
    return [synth_sample(g, n_text=rng.randint(2, 10), audio_in=rng.choice([None, rng.randint(2, 12)]),
                         audio_out=rng.randint(2, 24), train_audio=rng.random() < 0.8,
                         train_text_turn=rng.random() < 0.5) for _ in range(rng.randint(1, 3))]


def unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def fresh_compiler() -> None:
    """Forget every compiled graph and the counters (both are process-wide)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()


def test_compiled_layers_compile_once_per_shape_bucket():
    fresh_compiler()
    # layer 0 DualFFN, layer 1 fast-forward: two layer kinds (and layer 0 is the one whose input needs no grad)
    cfg = HiggsConfig.from_dict(tiny_config(hidden=32, heads=4, kv_heads=2, intermediate=48, layers=2,
                                            dual_layers=(0,)))
    torch.manual_seed(0)
    model = HiggsAudioModel(cfg)
    model.reset_buffers()
    apply_lora(model, r=4, alpha=8, seed=0)
    model.train()
    model.compile_layers(backend="aot_eager")
    g, rng = torch.Generator().manual_seed(0), random.Random(0)
    ratios = set()
    for _ in range(20):  # packed rows of one fixed length
        b = collate_rows([varied_samples(g, rng)], cfg, length=ROW)
        assert b.input_ids.shape == (1, ROW)
        ratios.add(round(b.discrete_idx.numel() / b.num_tokens, 2))
        model(b).normalized().backward()
    assert len(ratios) > 12  # the audio share really varied
    assert unique_graphs() == 2, unique_graphs()  # one graph per layer signature, no recompiles
    # Padded batches of varying length and size: dynamo makes the length, then the batch size, dynamic (at most two
    # more graphs per layer signature) and after that nothing recompiles.
    for _ in range(8):
        model(collate(varied_samples(g, rng), cfg)).normalized().backward()
    settled = unique_graphs()
    assert settled <= 6, settled
    for _ in range(8):
        model(collate(varied_samples(g, rng), cfg)).normalized().backward()
    assert unique_graphs() == settled
    # and the compiled layers compute what eager ones do
    b = collate_rows([varied_samples(g, rng)], cfg, length=ROW)
    with torch.no_grad():
        compiled = model.forward_hidden(b).hidden
        model.layers_compiled = False
        for layer in model.layers:
            layer._compiled_call_impl = None
        eager = model.forward_hidden(b).hidden
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_flex_block_masks_do_not_recompile():
    """The CUDA path (flex_attention, a fresh BlockMask and mask_mod closure per batch) reuses its graphs too.
    Forward only: torch 2.13 has no flex_attention backward on CPU."""
    fresh_compiler()
    cfg = HiggsConfig.from_dict(tiny_config(hidden=32, heads=4, kv_heads=2, intermediate=48, layers=2,
                                            dual_layers=(0,)))
    torch.manual_seed(0)
    model = HiggsAudioModel(cfg)
    model.reset_buffers()
    model.eval()
    model.attention_backend = "flex"
    model.compile_layers(backend="aot_eager")
    g, rng = torch.Generator().manual_seed(1), random.Random(1)
    with torch.no_grad():
        for _ in range(8):
            b = collate_rows([varied_samples(g, rng)], cfg, length=ROW)
            out = model.forward_hidden(b).hidden
        assert unique_graphs() == 2, unique_graphs()
        model.attention_backend = "dense"
        ref = model.forward_hidden(b).hidden
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
