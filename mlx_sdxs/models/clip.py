"""The CLIP text encoder (transformers `CLIPTextModel`) in MLX.

Follows transformers 5.24 `models/clip/modeling_clip.py`: token + learned position embeddings, pre-norm
transformer layers with causal self-attention, a final layer norm. Returns `last_hidden_state`, which
is what Stable Diffusion pipelines feed the UNet (no pooled output, no projection). Parameter names
mirror the checkpoint keys minus the `text_model.` prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlx_sdxs.errors import ConfigError
from mlx_sdxs.models.ops import UsesOps, gelu


def quick_gelu(x: mx.array) -> mx.array:
    """OpenAI CLIP's sigmoid approximation of GELU (CLIP-L); written out since MLX's approx differs."""
    return x * mx.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": gelu, "quick_gelu": quick_gelu}


@dataclass(frozen=True)
class CLIPTextConfig:
    """Defaults are transformers' `CLIPTextConfig` defaults, for config.json files that omit them."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_attention_heads: int = 8
    num_hidden_layers: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> CLIPTextConfig:
        """Known keys of a `CLIPTextConfig` json (or of a full `CLIPConfig`'s `text_config`); others ignored."""
        if isinstance(config.get("text_config"), dict):
            config = config["text_config"]
        made = cls(**{k: config[k] for k in cls.__dataclass_fields__ if config.get(k) is not None})
        if made.hidden_act not in ACTIVATIONS:
            raise ConfigError(
                f"text_encoder hidden_act: {made.hidden_act!r} is not supported (supported: {', '.join(ACTIVATIONS)})"
            )
        if made.hidden_size % made.num_attention_heads:
            raise ConfigError(
                f"text_encoder hidden_size: {made.hidden_size} is not divisible by "
                f"num_attention_heads {made.num_attention_heads}"
            )
        return made


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def __call__(self, input_ids: mx.array) -> mx.array:
        length = input_ids.shape[1]
        return self.token_embedding(input_ids) + self.position_embedding.weight[:length]


class CLIPAttention(UsesOps, nn.Module):
    def __init__(self, dims: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dims // num_heads) ** -0.5
        self.q_proj = nn.Linear(dims, dims)
        self.k_proj = nn.Linear(dims, dims)
        self.v_proj = nn.Linear(dims, dims)
        self.out_proj = nn.Linear(dims, dims)

    def __call__(self, x: mx.array) -> mx.array:
        batch, length, dims = x.shape

        def heads(t: mx.array) -> mx.array:
            return t.reshape(batch, length, self.num_heads, -1).transpose(0, 2, 1, 3)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        # The causal mask is built inside the kernel: no additive −inf/−1e9 array that could overflow or
        # swamp the scores in float16.
        out = self.ops.attention(q, k, v, self.scale, causal=True)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, dims))


class CLIPMLP(nn.Module):
    def __init__(self, dims: int, hidden_dims: int, activation: str):
        super().__init__()
        self.activation = ACTIVATIONS[activation]
        self.fc1 = nn.Linear(dims, hidden_dims)
        self.fc2 = nn.Linear(hidden_dims, dims)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = CLIPAttention(config.hidden_size, config.num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config.hidden_size, config.intermediate_size, config.hidden_act)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layers = [CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers)]

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPTextModel(nn.Module):
    """input_ids (B, L) int → last_hidden_state (B, L, hidden_size), after the final layer norm."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def __call__(self, input_ids: mx.array) -> mx.array:
        if input_ids.ndim != 2 or input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"input_ids must have shape (batch, length ≤ {self.config.max_position_embeddings}), "
                f"got {tuple(input_ids.shape)}"
            )
        return self.final_layer_norm(self.encoder(self.embeddings(input_ids)))
