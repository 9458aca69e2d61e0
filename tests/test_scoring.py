"""sdcore's scorers against their references on the same random weights, loaded from the files those
references save: transformers' CLIPModel and CLIPImageProcessor (its PIL backend), diffusers'
StableDiffusionSafetyChecker, and the LAION aesthetic predictor's MLP as its repository builds it."""
import time

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from reference import TINY_CLIP, randomize_, sd15_config
from scorerdata import (TINY_PROJECTION, TINY_VISION, VIT_L14, PublishedAestheticMLP, clip_config, reference_clip,
                        reference_safety_checker, save_aesthetic, tiny_clip_folder)
from sdcore import scorer_weights, scoring
from sdcore.errors import UnsupportedModelError, WeightsError
# (width, height): square, landscape, portrait, odd sides, smaller than 224 (upscaled), 224 by one more
SIZES = [(224, 224), (300, 200), (200, 300), (513, 511), (97, 401), (1001, 333), (225, 224)]
PROMPTS = ["a photo of a cat", "", "an oil painting of a lighthouse at dusk, dramatic clouds",
           "a very long prompt " + "with many many words " * 30]


def _images(sizes, seed: int = 0) -> list[PIL.Image.Image]:
    """RGB images with noise, gradients and stripes in proportions that vary per image."""
    gen = np.random.default_rng(seed)
    images = []
    for i, (w, h) in enumerate(sizes):
        y, x = np.mgrid[0:h, 0:w]
        gradient = np.stack([255 * x / w, 255 * y / h, 127 + 127 * np.sin((x + y) / (3 + i))], axis=-1)
        noise = gen.uniform(0, 255, (h, w, 3))
        mix = (i % 4) / 3
        images.append(PIL.Image.fromarray(((1 - mix) * gradient + mix * noise).astype(np.uint8)))
    return images


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    return tiny_clip_folder(folder), folder


def _pooled(output) -> torch.Tensor:
    # transformers 5 returns the projected embeddings as the pooler output of a model output
    return output.pooler_output if hasattr(output, "pooler_output") else output


def test_preprocess_equals_clip_image_processor():
    from transformers import CLIPImageProcessorPil

    images = _images(SIZES)
    expected = torch.from_numpy(np.stack(CLIPImageProcessorPil()(images)["pixel_values"]))
    got = scoring.preprocess(images)
    assert got.shape == (len(SIZES), 3, 224, 224) and got.dtype == torch.float32
    assert torch.equal(got, expected)
    # The pipeline's decoded images: uint8 [H, W, 3] arrays
    assert torch.equal(scoring.preprocess([np.asarray(image) for image in images]), expected)
    with pytest.raises(ValueError, match="uint8"):
        scoring.preprocess([np.zeros((8, 8, 3), dtype=np.float32)])
    with pytest.raises(ValueError, match="RGB"):
        scoring.preprocess([images[0].convert("L")])


def test_preprocessor_configs():
    # The 2022 format, as in the SD v1.5 release's feature_extractor/, and today's save_pretrained
    from transformers import CLIPImageProcessorPil

    legacy = {"crop_size": 224, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True, "do_resize": True,
              "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(scoring.CLIP_MEAN),
              "image_std": list(scoring.CLIP_STD), "resample": 3, "size": 224}
    assert scorer_weights.preprocessor_config(legacy) == 224
    assert scorer_weights.preprocessor_config(CLIPImageProcessorPil().to_dict()) == 224
    for changed, refusal in (({"resample": 2}, "resample 2"), ({"image_mean": [0.5] * 3}, "image_mean"),
                             ({"size": {"height": 224, "width": 224}}, "shortest edge"),
                             ({"size": 256}, "shortest edge")):
        with pytest.raises(UnsupportedModelError, match=refusal):
            scorer_weights.preprocessor_config({**legacy, **changed})


@torch.no_grad()
def _assert_embeddings_match(ref, folder, images: list, atol: float = 1e-4) -> dict:
    """Errors of our image and text embeddings, and the seconds our image tower took."""
    model, tokenizer = scorer_weights.load_clip(folder)
    pixels = scoring.preprocess(images)
    ids = tokenizer(PROMPTS)
    start = time.perf_counter()
    image_embeds = model(pixels)
    seconds = time.perf_counter() - start
    image_error = (image_embeds - _pooled(ref.get_image_features(pixel_values=pixels))).abs().max().item()
    text_error = (model.embed_text(ids) - _pooled(ref.get_text_features(input_ids=ids))).abs().max().item()
    assert image_error <= atol and text_error <= atol
    return {"image error": image_error, "text error": text_error, "image tower seconds": seconds}


def test_tiny_clip_embeddings_match_reference(tiny_clip):
    _assert_embeddings_match(*tiny_clip, _images(SIZES))


@torch.no_grad()
def test_image_encoder_loads_either_transformers_layout(tiny_clip, tmp_path):
    from transformers import CLIPVisionModelWithProjection

    ref, clip_folder = tiny_clip
    vision_only = CLIPVisionModelWithProjection(clip_config(TINY_CLIP, {**TINY_VISION, "projection_dim": TINY_PROJECTION},
                                                             TINY_PROJECTION).vision_config)
    vision_only = randomize_(vision_only, seed=4).eval()
    vision_only.save_pretrained(tmp_path)
    pixels = scoring.preprocess(_images(SIZES[:2]))
    for reference, folder in ((vision_only, tmp_path), (ref, clip_folder)):
        expected = _pooled(reference.get_image_features(pixel_values=pixels)) if reference is ref \
            else reference(pixel_values=pixels).image_embeds
        got = scorer_weights.load_image_encoder(folder)(pixels)
        assert (got - expected).abs().max().item() <= 1e-4


@torch.no_grad()
def test_clip_score_matches_transformers(tiny_clip):
    """torchmetrics' CLIPScore computed with transformers: its tokenizer (padding, attention mask),
    its image processor and model, 100 * max(cos, 0) per image-prompt pair."""
    from transformers import CLIPImageProcessorPil, CLIPTokenizer

    ref, folder = tiny_clip
    images = _images(SIZES[:4], seed=1)
    pairs = [(image, prompt) for image in images for prompt in PROMPTS]  # 16 rows
    ref_tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True, model_max_length=77)
    text = ref_tokenizer([p for _, p in pairs], padding=True, truncation=True, return_tensors="pt")
    text_embeds = _pooled(ref.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"]))
    pixels = torch.from_numpy(np.stack(CLIPImageProcessorPil()([i for i, _ in pairs])["pixel_values"]))
    image_embeds = _pooled(ref.get_image_features(pixel_values=pixels))
    expected = 100 * torch.clamp(F.cosine_similarity(image_embeds, text_embeds), min=0)

    model, tokenizer = scorer_weights.load_clip(folder)
    got = scoring.clip_score(model(scoring.preprocess([i for i, _ in pairs])),
                             model.embed_text(tokenizer([p for _, p in pairs])))
    assert got.shape == (len(pairs),)
    assert (got - expected).abs().max().item() <= 1e-3
    assert (got == 0).any() and (got > 0).any()  # both sides of the clamp are exercised


@pytest.mark.full_size
def test_full_size_clip_matches_reference(tmp_path, capsys):
    ref = reference_clip(sd15_config("text_encoder"), VIT_L14, 768, tmp_path)
    measured = _assert_embeddings_match(ref, tmp_path, _images(SIZES[:2]))
    with capsys.disabled():
        print("\nViT-L/14 CLIP, 2 images:", ", ".join(f"{k} {v:.2g}" for k, v in measured.items()))


# --- safety checker ----------------------------------------------------------------------------

def placed_safety_checker(vision: dict, projection_dim: int, images: list, folder):
    """A random diffusers safety checker with the image tower `vision`, its concepts and thresholds
    placed around the images' embeddings, saved into `folder`: image 0 is flagged outright; image 1
    only through the special-care adjustment; image 2 is 0.0004 over a threshold, which diffusers'
    rounding to 3 decimals ignores; no image comes near the other concepts. -> (reference, pixels)"""
    ref = reference_safety_checker(vision, projection_dim)
    pixels = scoring.preprocess(images)
    with torch.no_grad():
        embeds = F.normalize(ref.visual_projection(ref.vision_model(pixels)[1]))
        gen = torch.Generator().manual_seed(6)
        concepts = torch.randn(ref.concept_embeds.shape, generator=gen)
        concepts[:3] = embeds[:3]
        special = torch.randn(ref.special_care_embeds.shape, generator=gen)
        special[0] = embeds[1]
        cos, special_cos = embeds @ F.normalize(concepts).T, embeds @ F.normalize(special).T
        thresholds = cos.max(dim=0).values + 0.05
        thresholds[:3] = torch.stack([cos[0, 0] - 0.02, cos[1, 1] + 0.005, cos[2, 2] - 0.0004])
        special_thresholds = special_cos.max(dim=0).values + 0.05
        special_thresholds[0] = special_cos[1, 0] - 0.02
        ref.concept_embeds.copy_(concepts)
        ref.concept_embeds_weights.copy_(thresholds)
        ref.special_care_embeds.copy_(special)
        ref.special_care_embeds_weights.copy_(special_thresholds)
    ref.save_pretrained(folder)
    return ref, pixels


@pytest.fixture(scope="module")
def safety_checker(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd") / "safety_checker"
    images = _images([(w + 9 * i, h) for i, (w, h) in enumerate(SIZES[:6])], seed=2)
    ref, pixels = placed_safety_checker(TINY_VISION, TINY_PROJECTION, images, folder)
    return ref, folder, pixels


def _reference_decision(ref, pixels) -> list[bool]:
    _, flagged = ref(clip_input=pixels, images=np.zeros((len(pixels), 8, 8, 3)))
    return [bool(f) for f in flagged]


def _assert_decision_equals_diffusers(ref, folder, pixels):
    """Our checker loaded from `folder` decides as `ref` on the placed images -> (checker, nsfw_score)."""
    checker = scorer_weights.load_safety_checker(folder)
    nsfw_score, nsfw = checker(pixels)
    expected = _reference_decision(ref, pixels)
    assert nsfw.tolist() == expected
    assert expected[:3] == [True, True, False]
    assert nsfw_score[1].item() == pytest.approx(0.005, abs=1e-4)  # 0.005 under its own concept, lifted by 0.01
    assert 0 < nsfw_score[2].item() < 0.0005  # over its threshold, yet not flagged: diffusers rounds
    assert torch.equal(nsfw, torch.round(nsfw_score * 1000) > 0)
    return checker, nsfw_score


@torch.no_grad()
def test_safety_checker_decision_equals_diffusers(safety_checker):
    ref, folder, pixels = safety_checker
    checker, nsfw_score = _assert_decision_equals_diffusers(ref, folder, pixels)

    # The continuous score, from the reference's own embeddings: max over concepts of cos - threshold + adjustment
    embeds = F.normalize(ref.visual_projection(ref.vision_model(pixels)[1]))
    special_care = (embeds @ F.normalize(ref.special_care_embeds).T - ref.special_care_embeds_weights > 0).any(dim=1)
    scores = embeds @ F.normalize(ref.concept_embeds).T - ref.concept_embeds_weights + 0.01 * special_care[:, None]
    assert (nsfw_score - scores.max(dim=1).values).abs().max().item() <= 1e-5

    # Without special care, image 1 is no longer flagged, in both.
    for model in (ref, checker):
        model.special_care_embeds_weights.fill_(2.0)
    assert checker(pixels)[1].tolist() == _reference_decision(ref, pixels)
    assert _reference_decision(ref, pixels)[:3] == [True, False, False]


@pytest.mark.full_size
@torch.no_grad()
def test_full_size_safety_checker_decision_equals_diffusers(tmp_path, capsys):
    # SD v1.5's checker: a ViT-L/14 image tower, 768-wide projection, 17 concepts and 3 special-care ones.
    start = time.perf_counter()
    ref, pixels = placed_safety_checker(VIT_L14, 768, _images(SIZES[:3], seed=2), tmp_path)
    _assert_decision_equals_diffusers(ref, tmp_path, pixels)
    with capsys.disabled():
        print(f"\nViT-L/14 safety checker, 3 images: {time.perf_counter() - start:.1f}s")


def test_safety_checker_files_that_do_not_fit_are_refused(safety_checker, tmp_path):
    from safetensors.torch import load_file, save_file

    _, folder, _ = safety_checker
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    state = load_file(folder / "model.safetensors")
    state["concept_embeds"] = state["concept_embeds"][:, :5].contiguous()
    del state["special_care_embeds_weights"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(WeightsError, match=r"1 missing \(special_care_embeds_weights\).*concept_embeds is \[17, 5\]"):
        scorer_weights.load_safety_checker(tmp_path)
    (tmp_path / "config.json").write_text('{"vision_config": {"hidden_act": "gelu"}}')
    with pytest.raises(UnsupportedModelError, match="gelu"):
        scorer_weights.load_safety_checker(tmp_path)


# --- aesthetic predictor -----------------------------------------------------------------------

def _published_normalized(a: np.ndarray) -> np.ndarray:
    # simple_inference.py's L2 normalisation, in numpy
    l2 = np.atleast_1d(np.linalg.norm(a, 2, -1))
    l2[l2 == 0] = 1
    return a / np.expand_dims(l2, -1)


@torch.no_grad()
def test_aesthetic_predictor_matches_published_mlp(tmp_path):
    mlp = save_aesthetic(tmp_path / "sac+logos+ava1-l14-linearMSE.pth", 768)
    embeds = torch.randn(4, 768, generator=torch.Generator().manual_seed(8)) * 3
    expected = mlp(torch.from_numpy(_published_normalized(embeds.numpy()))).squeeze(-1)
    got = scorer_weights.load_aesthetic_predictor(tmp_path / "sac+logos+ava1-l14-linearMSE.pth")(embeds)
    assert got.shape == (4,)
    assert (got - expected).abs().max().item() <= 1e-5


class _RunsCode:
    def __reduce__(self):
        return (print, ("code from the weight file ran",))


def test_aesthetic_predictor_file_with_code_is_refused_unrun(tmp_path, capsys):
    state = {**randomize_(PublishedAestheticMLP(768), seed=7).state_dict(), "extra": _RunsCode()}
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match="weights_only=True"):
        scorer_weights.load_aesthetic_predictor(tmp_path / "bad.pth")
    assert "ran" not in capsys.readouterr().out
    with pytest.raises(WeightsError, match="no such file"):
        scorer_weights.load_aesthetic_predictor(tmp_path / "missing.pth")
