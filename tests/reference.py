"""Reference models (diffusers / transformers) with seeded random weights, shared by the tests.

The same weights go into the reference and into sdcore, so equal outputs prove that the real
SD v1.5 weights would produce the real images.
"""
import json
import math
import os
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SD15 = REPO / "tests" / "data" / "sd15"  # the SD v1.5 release's config files, as published

# Same block structure as SD v1.5 (four levels, the same block types), tiny widths.
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
    "sample_size": 8,
}
TINY_VAE = {
    "block_out_channels": [32, 32, 64, 64],
    "layers_per_block": 2,
    "norm_num_groups": 16,
    "latent_channels": 4,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "sample_size": 64,
}
TINY_CLIP = {
    "vocab_size": 49408,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 64,
}


def sd15_config(component: str) -> dict:
    """The real release's config file for `unet`, `vae` or `text_encoder`, exactly as published."""
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    return json.loads((SD15 / component / name).read_text())


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Overwrite every parameter with seeded noise of a sane scale.

    Default initialisations leave some layers at zero or one, which would hide a wrong key or a
    missing term; this makes every weight matter while keeping activations bounded.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if p.ndim == 1 and name.endswith("weight"):  # norm scales
            p.copy_(1.0 + 0.1 * noise)
        elif p.ndim == 1:  # biases
            p.copy_(0.05 * noise)
        else:
            fan_in = p[0].numel() if p.ndim > 1 else 1
            p.copy_(noise / math.sqrt(fan_in))
    return module


def reference_unet(config: dict, seed: int = 0):
    from diffusers import UNet2DConditionModel

    return randomize_(UNet2DConditionModel(**config), seed).eval()


def reference_vae(config: dict, seed: int = 1):
    from diffusers import AutoencoderKL

    return randomize_(AutoencoderKL(**config), seed).eval()


def reference_text_encoder(config: dict, seed: int = 2):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = {k: v for k, v in config.items() if k not in ("architectures", "torch_dtype")}
    return randomize_(CLIPTextModel(CLIPTextConfig(**cfg)), seed).eval()


def write_clip_vocab_folder(path) -> Path:
    """Write the bundled CLIP BPE as a diffusers-style `vocab.json` + `merges.txt` into `path`.

    Built straight from OpenAI's file layout (256 byte symbols, the same with `</w>`, one symbol
    per merge, then the two specials), independently of sdcore, so that transformers'
    `CLIPTokenizer.from_pretrained(path, local_files_only=True, model_max_length=77)` can serve as
    the oracle for `sdcore.tokenizer`.
    """
    import gzip

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(REPO / "sdcore" / "assets" / "bpe_simple_vocab_16e6.txt.gz", "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : 1 + 49152 - 256 - 2]
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = (b for b in range(256) if b not in printable)
    byte_chars = [chr(b) for b in printable] + [chr(256 + i) for i, _ in enumerate(extra)]
    symbols = byte_chars + [c + "</w>" for c in byte_chars] + [m.replace(" ", "") for m in merges]
    symbols += ["<|startoftext|>", "<|endoftext|>"]
    (path / "vocab.json").write_text(json.dumps({s: i for i, s in enumerate(symbols)}, ensure_ascii=False), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return path


# sdcore scheduler name → (diffusers class, extra config) used by the reference pipeline.
REFERENCE_SCHEDULERS = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "lms": ("LMSDiscreteScheduler", {}),
}


def reference_scheduler(name: str, scheduler_config: dict):
    import diffusers

    cls_name, extra = REFERENCE_SCHEDULERS[name]
    return getattr(diffusers, cls_name).from_config({**scheduler_config, **extra})


def write_diffusers_folder(path, unet, vae, text_encoder) -> Path:
    """Save reference models as a diffusers folder laid out like the SD v1.5 release."""
    path = Path(path)
    unet.save_pretrained(path / "unet")
    vae.save_pretrained(path / "vae")
    text_encoder.save_pretrained(path / "text_encoder")
    write_clip_vocab_folder(path / "tokenizer")
    (path / "tokenizer" / "tokenizer_config.json").write_text((SD15 / "tokenizer" / "tokenizer_config.json").read_text())
    (path / "scheduler").mkdir(parents=True, exist_ok=True)
    (path / "scheduler" / "scheduler_config.json").write_text((SD15 / "scheduler" / "scheduler_config.json").read_text())
    (path / "model_index.json").write_text((SD15 / "model_index.json").read_text())
    return path


def reference_pipeline(folder, scheduler: str):
    """diffusers' StableDiffusionPipeline over a folder written by `write_diffusers_folder`."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(folder / "vae").eval(),
        text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder").eval(),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True, model_max_length=77),
        unet=UNet2DConditionModel.from_pretrained(folder / "unet").eval(),
        scheduler=reference_scheduler(scheduler, scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
