"""Per-image quality signals on CLIP image embeddings, and the image preprocessing they share.

- CLIP score: how well an image matches its prompt, as torchmetrics' CLIPScore defines it.
- Safety checker: the SD release's `StableDiffusionSafetyChecker` (its own CLIP image tower and
  concept embeddings), with diffusers' exact decision and a continuous score beside it.
- Aesthetic score: the LAION improved aesthetic predictor, an MLP on ViT-L/14 image embeddings.
"""
import numpy as np
import PIL.Image
import torch
import torch.nn as nn
import torch.nn.functional as F

from sdcore.clip_vision import CLIPImageEncoder, CLIPVisionConfig

# OpenAI CLIP's per-channel statistics of its training images (every CLIP preprocessor_config.json's).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess(images: list, size: int = 224) -> torch.Tensor:
    """RGB PIL images or uint8 [H, W, 3] arrays (the pipeline's decoded images) -> [B, 3, size, size]
    float32, equal to transformers' CLIPImageProcessor (its PIL backend) with CLIP's configuration.

    Each image is resized with PIL's bicubic filter so that its shorter side is `size` (the longer
    one rounded down), centre-cropped to a square (odd margins leave the extra pixel on the right or
    bottom), scaled to [0, 1] in float64 as the reference does, then normalised in float32.
    """
    crops = np.stack([_resize_and_crop(_rgb(image), size) for image in images])  # [B, size, size, 3] uint8
    pixels = (torch.from_numpy(crops).double() * (1 / 255)).float()
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    return ((pixels - mean) / std).permute(0, 3, 1, 2).contiguous()


def _rgb(image) -> PIL.Image.Image:
    if isinstance(image, PIL.Image.Image):
        if image.mode != "RGB":
            raise ValueError(f"expected an RGB image, got a {image.mode} one")
        return image
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] array, got {array.dtype} {list(array.shape)}")
    return PIL.Image.fromarray(array)


def _resize_and_crop(image: PIL.Image.Image, size: int) -> np.ndarray:
    width, height = image.size
    short, long = sorted((width, height))
    long = int(size * long / short)
    resized = image.resize((size, long) if width <= height else (long, size), resample=PIL.Image.BICUBIC)
    top, left = (resized.height - size) // 2, (resized.width - size) // 2
    return np.asarray(resized)[top : top + size, left : left + size]


def clip_score(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """100 * max(cos, 0) for each row's image and prompt embeddings [B, D] -> [B] (torchmetrics' definition)."""
    return 100 * F.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1).clamp(min=0)


class SafetyChecker(CLIPImageEncoder):
    """diffusers' StableDiffusionSafetyChecker: images are compared by cosine with the embeddings of
    `concepts` unsafe concepts and `special_concepts` "special care" ones, each with its threshold.

    An image is flagged (`nsfw`) when for some concept cos - threshold + adjustment, rounded to
    3 decimals as diffusers rounds it, is above 0; the adjustment is 0.01 for an image that some
    special-care concept's cos - threshold (rounded alike) exceeds, else 0. `nsfw_score` is the
    largest unrounded cos - threshold + adjustment over the concepts: above 0.0005 means flagged,
    so nsfw == (round(nsfw_score, 3) > 0).
    """

    def __init__(self, cfg: CLIPVisionConfig, concepts: int = 17, special_concepts: int = 3):
        super().__init__(cfg)
        self.concept_embeds = nn.Parameter(torch.empty(concepts, cfg.projection_dim))
        self.special_care_embeds = nn.Parameter(torch.empty(special_concepts, cfg.projection_dim))
        self.concept_embeds_weights = nn.Parameter(torch.empty(concepts))  # the thresholds
        self.special_care_embeds_weights = nn.Parameter(torch.empty(special_concepts))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Preprocessed images [B, 3, S, S] -> nsfw_score [B] float32, nsfw [B] bool."""
        embeds = F.normalize(super().forward(pixels).float())

        def over_threshold(concepts: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
            return embeds @ F.normalize(concepts.float()).T - thresholds.float()  # [B, concepts]

        special_care = _above_zero_at_3_decimals(over_threshold(self.special_care_embeds,
                                                                self.special_care_embeds_weights)).any(dim=1)
        scores = over_threshold(self.concept_embeds, self.concept_embeds_weights) + 0.01 * special_care[:, None]
        nsfw_score = scores.max(dim=1).values
        return nsfw_score, _above_zero_at_3_decimals(nsfw_score)


def _above_zero_at_3_decimals(x: torch.Tensor) -> torch.Tensor:
    # diffusers compares round(x, 3) > 0 on float32: x * 1000 rounded half to even, as numpy does.
    return torch.round(x * 1000) > 0


class AestheticPredictor(nn.Module):
    """The LAION improved aesthetic predictor (christophschuhmann/improved-aesthetic-predictor):
    L2-normalised ViT-L/14 image embeddings [B, 768] -> scores [B], about 1 (worst) to 10 (best).

    The published model is purely linear (no activations between its layers); its dropouts, idle
    at inference, are kept because they fix the layer indices of the published weight file.
    """

    def __init__(self, embed_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(F.normalize(image_embeds.float(), dim=-1).to(self.layers[0].weight.dtype)).squeeze(-1)
