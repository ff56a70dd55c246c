"""A small module tree named like HiggsAudioModel, for LoRA tests (also imported by their FSDP2 subprocess)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from minihiggs.lora.apply import lora_parameters

# ---------------------------------------------------------------------------------------------------------------
# a small module tree named like HiggsAudioModel (dual-FFN layers, fast-forward layers, a Whisper tower, heads)


class RMS(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.weight


class Attn(nn.Module):
    def __init__(self, d, kv):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(d, d, bias=False), nn.Linear(d, kv, bias=False)
        self.v_proj, self.o_proj = nn.Linear(d, kv, bias=False), nn.Linear(d, d, bias=False)

    def forward(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        k, v = k.repeat(1, 1, q.shape[-1] // k.shape[-1]), v.repeat(1, 1, q.shape[-1] // v.shape[-1])
        return self.o_proj(F.scaled_dot_product_attention(q, k, v, is_causal=True))


class MLP(nn.Module):
    def __init__(self, d, i):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, i, bias=False), nn.Linear(d, i, bias=False)
        self.down_proj = nn.Linear(i, d, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, d, kv, i, dual):
        super().__init__()
        self.self_attn, self.mlp = Attn(d, kv), MLP(d, i)
        self.input_layernorm, self.post_attention_layernorm = RMS(d), RMS(d)
        if dual:
            self.audio_mlp = MLP(d, i)
            self.audio_post_attention_layernorm = RMS(d)

    def forward(self, x, audio):
        x = x + self.self_attn(self.input_layernorm(x))
        y = self.mlp(self.post_attention_layernorm(x))
        if hasattr(self, "audio_mlp"):
            y = torch.where(audio[..., None], self.audio_mlp(self.audio_post_attention_layernorm(x)), y)
        return x + y


class TowerAttn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(d, d), nn.Linear(d, d, bias=False)
        self.v_proj, self.out_proj = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        return self.out_proj(F.scaled_dot_product_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x)))


class TowerLayer(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.self_attn, self.self_attn_layer_norm = TowerAttn(d), nn.LayerNorm(d)
        self.fc1, self.fc2, self.final_layer_norm = nn.Linear(d, 2 * d), nn.Linear(2 * d, d), nn.LayerNorm(d)

    def forward(self, x):
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class Tower(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.layers = nn.ModuleList([TowerLayer(d) for _ in range(2)])
        self.layer_norm = nn.LayerNorm(d)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)


class Proj(nn.Module):
    def __init__(self, d_in, d):
        super().__init__()
        self.linear = nn.Linear(d_in, d)


class Heads(nn.Module):
    def __init__(self, d, v):
        super().__init__()
        self.text_lm_head, self.audio_lm_head = nn.Linear(d, v, bias=False), nn.Linear(d, 3 * v, bias=False)


class Toy(nn.Module):
    """embed -> 4 layers (dual FFN in 0 and 2) -> norm -> heads, plus a Whisper-like tower feeding row 0."""

    def __init__(self, d=32, kv=16, inter=48, vocab=50, tower=True):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([Layer(d, kv, inter, dual=i % 2 == 0) for i in range(4)])
        self.norm = RMS(d)
        self.audio_decoder_proj = Heads(d, vocab)
        if tower:
            self.audio_tower = Tower(24)
            self.audio_encoder_proj = Proj(24, d)

    def forward(self, ids, audio, feats=None):
        x = self.embed_tokens(ids)
        if feats is not None and hasattr(self, "audio_tower"):
            x = x + self.audio_encoder_proj.linear(self.audio_tower(feats)).mean(1, keepdim=True)
        for layer in self.layers:
            x = layer(x, audio)
        x = self.norm(x)
        return torch.cat([self.audio_decoder_proj.text_lm_head(x), self.audio_decoder_proj.audio_lm_head(x)], -1)


def toy_inputs(seed=0, b=2, t=7):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 50, (b, t), generator=g), torch.rand(b, t, generator=g) < 0.4,
            torch.randn(b, 5, 24, generator=g))


def toy(seed=0, **kw):
    torch.manual_seed(seed)
    return Toy(**kw)


def randomize_lora(model, seed=1, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * std)
