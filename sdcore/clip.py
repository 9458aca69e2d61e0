"""CLIP text encoder of Stable Diffusion 1.x (the text tower of OpenAI's CLIP ViT-L/14).

Parameter names are those of transformers' `CLIPTextModel` without the leading `text_model.`,
so a diffusers `text_encoder/` folder loads after stripping that prefix and nothing else.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F



@dataclass
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5


class SelfAttention(nn.Module):
    def __init__(self, cfg: CLIPTextConfig, causal: bool):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.causal = causal
        dim = cfg.hidden_size
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (proj(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        # No padding mask: SD 1.x was trained attending to the padding (end) tokens too.
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # [B, heads, T, head_dim]
        return self.out_proj(out.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # quick-GELU, the approximation CLIP was trained with


class EncoderLayer(nn.Module):
    """One transformer layer of either CLIP tower: the text tower's attention is causal, the image
    tower's (sdcore.clip_vision, same fields in its config) sees every patch."""

    def __init__(self, cfg: CLIPTextConfig, causal: bool = True):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SelfAttention(cfg, causal)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.config = cfg
        # ModuleDicts only to reproduce the checkpoint's `embeddings.*` / `encoder.layers.*` names.
        # Tables start empty (weights are always loaded): Embedding's default normal_ init, run on
        # the meta device as the loader builds modules, imports torch's Python reference ops, which
        # cost about 3 s of every cold start.
        self.embeddings = nn.ModuleDict({
            "token_embedding": nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                            _weight=torch.empty(cfg.vocab_size, cfg.hidden_size)),
            "position_embedding": nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size,
                                               _weight=torch.empty(cfg.max_position_embeddings, cfg.hidden_size)),
        })
        self.encoder = nn.ModuleDict({"layers": nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))})
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: [B, T] with T <= max_position_embeddings (77) -> last hidden state [B, T, hidden]
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.embeddings.token_embedding(input_ids) + self.embeddings.position_embedding(positions)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.final_layer_norm(x)
