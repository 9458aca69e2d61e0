"""`builtin:tiny`, a demo model that needs no download. Its images are noise.

It is Stable Diffusion 1.x's architecture (every block type, four levels, cross-attention, the VAE,
the CLIP text encoder) at tiny widths, with seeded random weights that were never trained, and the
real CLIP tokenizer. It exists so that `make demo`, the job tests and any pipeline plumbing run end
to end on any machine in seconds. For pictures, load real SD 1.x weights.
"""
import math

import torch

from sdcore import configs as config_readers
from sdcore import weights
from sdcore.pipeline import Pipeline
from sdcore.tokenizer import Tokenizer

NAME = "builtin:tiny"
# Changes whenever the weights below would change, so finished job outputs are never mixed with new ones.
FINGERPRINT = "builtin:tiny/v1"
SEED = 20240501

# Config files as a diffusers folder would hold them, read by the same config readers.
TINY_UNET = {
    "block_out_channels": [32, 64, 64, 64],
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 64,
    "norm_num_groups": 16,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "in_channels": 4,
    "out_channels": 4,
}
TINY_VAE = {
    "block_out_channels": [32, 32, 64, 64],
    "layers_per_block": 2,
    "norm_num_groups": 16,
    "latent_channels": 4,
    "in_channels": 3,
    "out_channels": 3,
}
TINY_CLIP = {
    "vocab_size": 49408,  # the real vocabulary, so every prompt the tokenizer makes is valid input
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
}


def configs() -> dict:
    return {
        "unet": config_readers.unet_config(TINY_UNET),
        "vae": config_readers.vae_config(TINY_VAE),
        "text_encoder": config_readers.clip_config(TINY_CLIP),
    }


def load(name: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Pipeline:
    if name != NAME:
        raise weights.WeightsError(f"unknown built-in model {name!r}; the only one is {NAME!r}")
    cfgs = configs()
    tensors = random_weights(cfgs)
    modules = weights.assign_weights(weights.on_meta(cfgs), lambda c, k: tensors[c][k], device, dtype)
    return Pipeline(tokenizer=Tokenizer.default(), **modules, scheduler_config=dict(weights.SD15_SCHEDULER_CONFIG),
                    source=NAME, fingerprint=FINGERPRINT, device=torch.device(device), dtype=dtype)


def random_weights(cfgs: dict) -> dict[str, dict[str, torch.Tensor]]:
    """Seeded float32 weights, drawn on the CPU in name order: the same numbers on every machine.

    The scales keep activations bounded through every layer (norm scales near 1, small biases,
    matrices normalised by fan-in), so outputs are finite, varied noise rather than zeros or inf.
    """
    gen = torch.Generator("cpu").manual_seed(SEED)
    out = {}
    for component, module in weights.on_meta(cfgs).items():
        out[component] = {}
        for name, p in sorted(module.state_dict().items()):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.ndim == 1 and name.endswith("weight"):
                noise = 1.0 + 0.1 * noise
            elif p.ndim == 1:
                noise = 0.05 * noise
            else:
                noise = noise / math.sqrt(p[0].numel())
            out[component][name] = noise
    return out
