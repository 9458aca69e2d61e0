import pytest
import torch

from reference import TINY_CLIP, reference_text_encoder, sd15_config
from sdcore.clip import CLIPTextConfig, CLIPTextEncoder
from sdcore import configs
from sdcore.errors import UnsupportedModelError

BOS, EOS = 49406, 49407


def _strip(state_dict: dict) -> dict:
    # The 2022 release files say `text_model.embeddings...`; transformers 5 already drops the prefix.
    return {k.removeprefix("text_model."): v for k, v in state_dict.items()}


def _ids() -> torch.Tensor:
    """Three prompts padded with end tokens to 77, as the tokenizer makes them: short, empty, full."""
    gen = torch.Generator().manual_seed(0)
    rows = [
        [BOS, 320, 1125, 539, 320, 2368, 1773, 2184, 267, 3143, 4605, EOS],  # common-word ids ("a photo of a cat" ...)
        [BOS, EOS],
        [BOS, *torch.randint(0, BOS, (75,), generator=gen).tolist(), EOS],
    ]
    return torch.tensor([r + [EOS] * (77 - len(r)) for r in rows])


@pytest.fixture(scope="module")
def reference():
    return reference_text_encoder(TINY_CLIP)


@torch.no_grad()
def test_tiny_matches_reference(reference):
    ours = CLIPTextEncoder(configs.clip_config(TINY_CLIP)).eval()
    ours.load_state_dict(_strip(reference.state_dict()), strict=True)
    ids = _ids()
    expected = reference(input_ids=ids).last_hidden_state
    got = ours(ids)
    assert got.shape == (3, 77, TINY_CLIP["hidden_size"])
    assert (got - expected).abs().max().item() <= 1e-4
    # The causal mask matters: a later token must not change earlier positions.
    changed = ids.clone()
    changed[0, 20] = 1000
    assert torch.equal(ours(changed)[0, :20], got[0, :20])


@torch.no_grad()
def test_meta_build_then_assign_load(reference):
    with torch.device("meta"):
        ours = CLIPTextEncoder(configs.clip_config(TINY_CLIP))
    assert list(ours.buffers()) == []
    ours.load_state_dict(_strip(reference.state_dict()), strict=True, assign=True)
    assert all(p.device.type == "cpu" for p in ours.parameters())
    ids = _ids()
    assert (ours(ids) - reference(input_ids=ids).last_hidden_state).abs().max().item() <= 1e-4


def _reference_config(published: dict):
    from transformers import CLIPTextConfig as RefConfig

    return RefConfig(**{k: v for k, v in published.items() if k not in ("architectures", "torch_dtype")})


def test_sd15_keys_and_shapes():
    from transformers import CLIPTextModel

    published = sd15_config("text_encoder")
    with torch.device("meta"):
        ref = CLIPTextModel(_reference_config(published))
        ours = CLIPTextEncoder(configs.clip_config(published))
    expected = {k: tuple(v.shape) for k, v in _strip(ref.state_dict()).items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got == expected
    assert sum(p.numel() for p in ours.parameters()) == 123_060_480


def test_config_parsing():
    published = sd15_config("text_encoder")
    assert configs.clip_config(published) == CLIPTextConfig()
    # What today's save_pretrained writes for the same model (other keys, corrected bos/eos ids).
    saved = _reference_config(published).to_dict()
    assert configs.clip_config(saved) == CLIPTextConfig()
    assert configs.clip_config({}) == CLIPTextConfig()

    open_clip_h = {**published, "hidden_act": "gelu", "hidden_size": 1024, "intermediate_size": 4096,
                   "num_attention_heads": 16, "num_hidden_layers": 23, "projection_dim": 512}
    with pytest.raises(UnsupportedModelError, match=r"Stable Diffusion 2\.x.*SD 1\.x only"):
        configs.clip_config(open_clip_h)
    bigg = {**open_clip_h, "hidden_size": 1280, "num_attention_heads": 20, "num_hidden_layers": 32}
    with pytest.raises(UnsupportedModelError, match="SDXL"):
        configs.clip_config(bigg)
