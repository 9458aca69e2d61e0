"""CLIP's image tower (a ViT; ViT-L/14 at 224x224 by default) and the projections of both towers
into CLIP's joint embedding space, where image and text embeddings are compared by cosine.

Parameter names are those of transformers' `CLIPVisionModelWithProjection` and `CLIPModel`, so
their files load without renaming. The encoder layers are the text tower's (sdcore.clip) without
its causal mask.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from sdcore.clip import CLIPTextConfig, CLIPTextEncoder, EncoderLayer


@dataclass
class CLIPVisionConfig:
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768  # width of the joint embedding space


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size,
                                         bias=False)
        positions = (cfg.image_size // cfg.patch_size) ** 2 + 1  # the patches and the class token
        # Starts empty, as the text tower's tables do (weights are always loaded).
        self.position_embedding = nn.Embedding(positions, cfg.hidden_size,
                                               _weight=torch.empty(positions, cfg.hidden_size))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # pixels: [B, C, S, S] -> [B, 1 + (S / patch)^2, hidden], the class token first
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(len(pixels), 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class CLIPVisionTransformer(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic: the checkpoints' name
        self.encoder = nn.ModuleDict({"layers": nn.ModuleList(EncoderLayer(cfg, causal=False)
                                                              for _ in range(cfg.num_hidden_layers))})
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # pixels: [B, C, S, S] normalised as sdcore.scoring.preprocess makes them -> pooled [B, hidden]
        x = self.pre_layrnorm(self.embeddings(pixels))
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x[:, 0])  # the class token's state stands for the image


class CLIPImageEncoder(nn.Module):
    """Images -> CLIP image embeddings [B, projection_dim] (transformers' CLIPVisionModelWithProjection)."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.vision_model = CLIPVisionTransformer(cfg)
        self.visual_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual_projection(self.vision_model(pixels))


class CLIPModel(CLIPImageEncoder):
    """Both towers with their projections (transformers' CLIPModel, less the logit scale of training)."""

    def __init__(self, text: CLIPTextConfig, vision: CLIPVisionConfig):
        super().__init__(vision)
        self.text_model = CLIPTextEncoder(text)
        self.text_projection = nn.Linear(text.hidden_size, vision.projection_dim, bias=False)

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T] as sdcore.tokenizer makes them -> CLIP text embeddings [B, projection_dim]."""
        hidden = self.text_model(input_ids)  # [B, T, hidden]
        # The prompt is pooled at its first end token: the highest id of CLIP's vocabulary, so argmax
        # finds it (as transformers does for the published configs, whose eos_token_id is stale).
        pooled = hidden[torch.arange(len(input_ids), device=hidden.device), input_ids.argmax(dim=-1)]
        return self.text_projection(pooled)
