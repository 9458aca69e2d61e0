"""sdcore: Stable Diffusion 1.x in plain PyTorch."""
import os

import torch

__all__ = ["load_pipeline"]


def load_pipeline(source: str | os.PathLike, *, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32):
    """Tokenizer, text encoder, UNet and VAE ready for inference, as a `sdcore.pipeline.Pipeline`.

    `source` is a diffusers folder (`model_index.json`, `unet/`, `vae/`, `text_encoder/`, ...), a
    single `.safetensors` / `.ckpt` file with the original SD 1.x names, or "builtin:tiny" (a tiny
    demo model whose images are noise). Raises `sdcore.errors.WeightsError` for missing, truncated
    or mismatched files and `sdcore.errors.UnsupportedModelError` for other model families.
    """
    # Imported here so that importing one sdcore module does not import (and depend on) all others.
    from sdcore import builtin, weights

    if str(source).startswith("builtin:"):
        return builtin.load(str(source), device=device, dtype=dtype)
    return weights.load(source, device=device, dtype=dtype)
