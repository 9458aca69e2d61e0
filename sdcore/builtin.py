"""`builtin:tiny`, a demo model that needs no download. Its images are noise.

It is Stable Diffusion 1.x's architecture (every block type, four levels, cross-attention, the VAE,
the CLIP text encoder) at tiny widths, with seeded random weights that were never trained, and the
real CLIP tokenizer. It exists so that `make demo`, the job tests and any pipeline plumbing run end
to end on any machine in seconds. For pictures, load real SD 1.x weights.

Beside it, tiny random scorers (`write_tiny_scorers`) for `--score`, written as files in their
published layouts, for the same reason.
"""
import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from sdcore import configs as config_readers
from sdcore import scorer_weights, weights
from sdcore.clip_vision import CLIPModel
from sdcore.pipeline import Pipeline
from sdcore.scoring import CLIP_MEAN, CLIP_STD, AestheticPredictor, SafetyChecker
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
    return {component: _random_state(module, gen) for component, module in weights.on_meta(cfgs).items()}


def _random_state(module: torch.nn.Module, gen: torch.Generator) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in sorted(module.state_dict().items()):
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if p.ndim == 1 and name.endswith("weight"):
            noise = 1.0 + 0.1 * noise
        elif p.ndim == 1:
            noise = 0.05 * noise
        else:
            noise = noise / math.sqrt(p[0].numel())
        out[name] = noise
    return out


# Tiny scorers for `--score` (sdcore.scoring): ViT-L/14's structure at 224x224 in 7x7 patches of 32, tiny widths.
TINY_VISION = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
TINY_PROJECTION = 32
# A `feature_extractor/preprocessor_config.json` of the SD v1.5 release's format: CLIP's preprocessing.
CLIP_PREPROCESSOR = {"crop_size": 224, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True,
                     "do_resize": True, "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(CLIP_MEAN),
                     "image_std": list(CLIP_STD), "resample": 3, "size": 224}


def write_tiny_scorers(root: str | os.PathLike) -> dict[str, Path]:
    """Seeded random scorers at tiny widths, in the layouts `sdbatch run --score` reads: a transformers
    CLIP folder, a folder holding a diffusers `safety_checker/` and its `feature_extractor/`, and the
    aesthetic predictor's weights (on the tiny CLIP's embeddings). Their scores are noise;
    they exist so that jobs and benchmarks can score on any machine in seconds.
    Returns the sources by option: {"clip_model": ..., "safety_checker": ..., "aesthetic_model": ...}."""
    root = Path(root)
    gen = torch.Generator("cpu").manual_seed(SEED + 1)
    vision = scorer_weights.vision_config(TINY_VISION, TINY_PROJECTION)
    with torch.device("meta"):
        clip = CLIPModel(config_readers.clip_config(TINY_CLIP), vision)
        checker = SafetyChecker(vision)
        aesthetic = AestheticPredictor(TINY_PROJECTION)
    sources = {"clip_model": root / "clip", "safety_checker": root / "sd", "aesthetic_model": root / "aesthetic.safetensors"}
    _write_model(sources["clip_model"], {"text_config": TINY_CLIP, "vision_config": TINY_VISION,
                                         "projection_dim": TINY_PROJECTION}, _random_state(clip, gen))
    # diffusers wraps a whole CLIPVisionModel, so the image tower's names are nested once more.
    _write_model(sources["safety_checker"] / scorer_weights.SAFETY_CHECKER_FOLDER,
                 {"vision_config": TINY_VISION, "projection_dim": TINY_PROJECTION},
                 {f"vision_model.{k}" if k.startswith("vision_model.") else k: v
                  for k, v in _random_state(checker, gen).items()})
    preprocessor = sources["safety_checker"] / scorer_weights.FEATURE_EXTRACTOR_FILE
    preprocessor.parent.mkdir(parents=True, exist_ok=True)
    preprocessor.write_text(json.dumps(CLIP_PREPROCESSOR))
    save_file(_random_state(aesthetic, gen), sources["aesthetic_model"])
    return sources


def _write_model(folder: Path, config: dict, state: dict[str, torch.Tensor]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(state, folder / "model.safetensors")


ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "q_proj", "k_proj", "v_proj")  # the UNet's, the text encoder's


def write_tiny_adapters(root: str | os.PathLike) -> dict[str, Path]:
    """Seeded random adapters for builtin:tiny, so that jobs using `--lora` and `--embedding` run anywhere:
    a kohya-format LoRA over the UNet's attention and the text encoder's attention, and a two-vector
    textual-inversion embedding in A1111's safetensors layout. Returns {"lora": path, "embedding": path}."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator("cpu").manual_seed(SEED + 2)
    cfgs = configs()
    modules = weights.on_meta(cfgs)
    lora, rank = {}, 4
    for prefix, module in (("lora_unet_", modules["unet"]), ("lora_te_text_model_", modules["text_encoder"])):
        for name, layer in module.named_modules():
            if not (isinstance(layer, torch.nn.Linear) and name.endswith(ATTENTION_PROJECTIONS)):
                continue
            key = prefix + name.replace(".", "_")
            down = torch.randn(rank, layer.in_features, generator=gen) / layer.in_features ** 0.5
            lora[f"{key}.lora_down.weight"] = down
            lora[f"{key}.lora_up.weight"] = torch.randn(layer.out_features, rank, generator=gen) / rank ** 0.5
            lora[f"{key}.alpha"] = torch.tensor(float(rank))
    paths = {"lora": root / "style.safetensors", "embedding": root / "toy.safetensors"}
    save_file(lora, paths["lora"])
    width = cfgs["text_encoder"].hidden_size
    save_file({"emb_params": torch.randn(2, width, generator=gen) * 0.02}, paths["embedding"])
    return paths
