"""Tiny random scorers, written as their references save them: transformers' CLIPModel, diffusers'
StableDiffusionSafetyChecker (with the feature_extractor/ beside it), the LAION aesthetic MLP."""
import torch.nn as nn

from sdcore.builtin import TINY_PROJECTION, TINY_VISION
from tests.reference import TINY_CLIP, randomize_, write_clip_vocab_folder

VIT_L14 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
           "image_size": 224, "patch_size": 14, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}


def clip_config(text: dict, vision: dict, projection_dim: int):
    from transformers import CLIPConfig

    text = {k: v for k, v in text.items() if k not in ("architectures", "torch_dtype", "projection_dim")}
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def reference_clip(text: dict, vision: dict, projection_dim: int, folder, seed: int = 3):
    """A random transformers CLIPModel, saved with its tokenizer files into `folder`."""
    from transformers import CLIPModel

    ref = randomize_(CLIPModel(clip_config(text, vision, projection_dim)), seed=seed).eval()
    ref.save_pretrained(folder)
    write_clip_vocab_folder(folder)
    return ref


def tiny_clip_folder(folder):
    return reference_clip(TINY_CLIP, TINY_VISION, TINY_PROJECTION, folder)


def reference_safety_checker(vision: dict = TINY_VISION, projection_dim: int = TINY_PROJECTION, seed: int = 5):
    """A random diffusers StableDiffusionSafetyChecker (17 concepts, 3 special-care ones) with the image
    tower `vision`; tiny by default."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    ref = StableDiffusionSafetyChecker(clip_config(TINY_CLIP, vision, projection_dim))
    return randomize_(ref, seed=seed).eval()


def save_safety_checker(ref, root):
    """`ref` as a SD release holds it: `root/safety_checker/` and `root/feature_extractor/`."""
    from transformers import CLIPImageProcessorPil

    ref.save_pretrained(root / "safety_checker")
    CLIPImageProcessorPil().save_pretrained(root / "feature_extractor")
    return root


class PublishedAestheticMLP(nn.Module):
    """The predictor as christophschuhmann/improved-aesthetic-predictor builds it (simple_inference.py)."""

    def __init__(self, input_size: int):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(self.input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x):
        return self.layers(x)


def save_aesthetic(path, input_size: int = TINY_PROJECTION, seed: int = 7):
    """A random predictor's state dict saved as the repository saved its `.pth`."""
    import torch

    mlp = randomize_(PublishedAestheticMLP(input_size), seed=seed).eval()
    torch.save(mlp.state_dict(), path)
    return mlp
