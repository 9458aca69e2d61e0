"""Text to image: the loaded components and the denoising loop around them."""
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class Pipeline:
    tokenizer: object  # sdcore.tokenizer.Tokenizer
    text_encoder: nn.Module  # sdcore.clip.CLIPTextEncoder
    unet: nn.Module  # sdcore.unet.UNet
    vae: nn.Module  # sdcore.vae.AutoencoderKL
    scheduler_config: dict  # the model's scheduler_config.json (SD v1.5's values when it has none)
    source: str  # what load_pipeline was given
    fingerprint: str  # identifies the weights: same string <=> same model
    device: torch.device
    dtype: torch.dtype
