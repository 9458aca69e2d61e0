"""LoRA adapters: both file formats equal diffusers' load_lora_weights + set_adapters, and switching
adapter sets leaves the base weights bit-identical."""
import hashlib
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import sdcore
from sdcore.errors import LoRAError
from sdcore.lora import Adapters, lora_problems, read_lora
from tests.reference import reference_pipeline
from tests.test_pipeline import tiny_folder  # noqa: F401 (a fixture)

GENERATE = dict(steps=3, guidance_scale=7.5, height=64, width=48)
PROMPTS, SEEDS = ["a red fox in snow", "a lighthouse at dusk"], [7, 8]


@pytest.fixture(scope="module")
def pipe(tiny_folder):  # noqa: F811
    return sdcore.load_pipeline(str(tiny_folder))


def layer_names(pipe, component: str, ends: tuple[str, ...]) -> list[str]:
    """The component's linear and convolution layers whose names end with one of `ends`."""
    return [name for name, m in getattr(pipe, component).named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and name.endswith(ends)]


ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
CONVS = ("resnets.0.conv1", "conv_shortcut", "proj_in", "downsamplers.0.conv")  # 3x3 and 1x1
TEXT = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def write_lora(path, pipe, layers: dict[str, list[str]], kohya: bool, rank: int, seed: int, alpha: float | None = None):
    """A LoRA of seeded random tensors over `layers` ({component: module names}), in kohya's or diffusers' format."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for component, names in layers.items():
        modules = dict(getattr(pipe, component).named_modules())
        for name in names:
            weight = modules[name].weight
            down = torch.randn(rank, *weight.shape[1:], generator=gen) / math.sqrt(weight[0].numel())
            up = torch.randn(weight.shape[0], rank, *[1] * (weight.ndim - 2), generator=gen) * 0.5 / math.sqrt(rank)
            if kohya:
                full = ("text_model." if component == "text_encoder" else "") + name
                prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_"}[component] + full.replace(".", "_")
                tensors |= {f"{prefix}.lora_down.weight": down, f"{prefix}.lora_up.weight": up}
                if alpha is not None:
                    tensors[f"{prefix}.alpha"] = torch.tensor(alpha)
            else:
                prefix = {"unet": "unet.", "text_encoder": "text_encoder.text_model."}[component] + name
                tensors |= {f"{prefix}.lora_A.weight": down, f"{prefix}.lora_B.weight": up}
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def lora_files(pipe, tmp_path_factory):
    """name → path: a kohya LoRA with alpha over attention, convolutions and the text encoder, a diffusers one
    over the same kinds of layers, and one for each component alone."""
    root = tmp_path_factory.mktemp("loras")
    attention, convs = layer_names(pipe, "unet", ATTENTION), layer_names(pipe, "unet", CONVS)
    text = layer_names(pipe, "text_encoder", TEXT)
    assert attention and convs and text
    feed_forward = layer_names(pipe, "unet", ("ff.net.0.proj", "ff.net.2", "time_emb_proj"))
    return {
        "kohya": write_lora(root / "kohya.safetensors", pipe, {"unet": attention + convs, "text_encoder": text},
                            kohya=True, rank=4, seed=1, alpha=2.0),
        "peft": write_lora(root / "peft.safetensors", pipe, {"unet": attention[::2] + feed_forward + convs[1:],
                                                            "text_encoder": text[::2]}, kohya=False, rank=8, seed=2),
        "unet_only": write_lora(root / "unet.safetensors", pipe, {"unet": attention + convs}, kohya=True, rank=3, seed=3),
        "text_only": write_lora(root / "text.safetensors", pipe, {"text_encoder": text}, kohya=False, rank=2, seed=4),
    }


def generate_both(tiny_folder, pipe, lora_files, adapters: list[tuple[str, float]], output: str):  # noqa: F811
    """(sdcore's, diffusers') outputs for PROMPTS with the named LoRA files at their scales."""
    reference = reference_pipeline(tiny_folder, "ddim")
    for name, _ in adapters:
        reference.load_lora_weights(str(lora_files[name]), adapter_name=name)
    reference.set_adapters([name for name, _ in adapters], adapter_weights=[scale for _, scale in adapters])
    theirs = reference(PROMPTS, num_inference_steps=GENERATE["steps"], guidance_scale=GENERATE["guidance_scale"],
                       height=GENERATE["height"], width=GENERATE["width"], output_type=output,
                       generator=[torch.Generator("cpu").manual_seed(s) for s in SEEDS]).images
    active = Adapters(pipe)
    active.activate([(read_lora(lora_files[name], name), scale) for name, scale in adapters])
    try:
        ours = pipe.generate(PROMPTS, seeds=SEEDS, scheduler="ddim", output=output, **GENERATE)
    finally:
        active.activate([])
    return ours, theirs


@pytest.mark.parametrize("adapters", [
    [("kohya", 0.8), ("peft", 0.5)],
    [("unet_only", 1.0)],
    [("text_only", 1.3)],
], ids=["kohya+peft", "unet-only", "text-encoder-only"])
def test_equals_diffusers_lora(tiny_folder, pipe, lora_files, adapters):  # noqa: F811
    ours, theirs = generate_both(tiny_folder, pipe, lora_files, adapters, "latent")
    base = pipe.generate(PROMPTS, seeds=SEEDS, scheduler="ddim", output="latent", **GENERATE)
    for a, b, plain in zip(ours, theirs, base):
        print(adapters, "latent max diff", (a - b).abs().max().item(), "lora effect", (a - plain).abs().max().item())
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert (a - plain).abs().max() > 0.05, "the LoRA should change the latents"
    ours, theirs = generate_both(tiny_folder, pipe, lora_files, adapters, "np")
    for a, b in zip(ours, theirs):
        b = (b * 255).round().astype(np.uint8)
        print(adapters, "uint8 max diff", np.abs(a.astype(int) - b.astype(int)).max())
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_switching_sets_many_times_leaves_the_base_weights_bit_identical(tiny_folder, pipe, lora_files, dtype):  # noqa: F811
    pipe = pipe if dtype == torch.float32 else sdcore.load_pipeline(str(tiny_folder), dtype=dtype)
    loras = {name: read_lora(path, name) for name, path in lora_files.items()}
    snapshot = {name: p.detach().clone() for name, p in [*pipe.unet.named_parameters(), *pipe.text_encoder.named_parameters()]}
    sets = [[(loras["kohya"], 0.8)], [(loras["kohya"], 0.8), (loras["peft"], 0.5)], [(loras["text_only"], 1.3)],
            [(loras["unet_only"], -0.7), (loras["kohya"], 0.3)], [], [(loras["peft"], 1.0)]]
    adapters = Adapters(pipe)
    merged = {}  # each set's weights, the first time it was active
    for i in range(60):
        adapters.activate(sets[i % len(sets)])
        assert adapters.active == tuple((lora.name, scale) for lora, scale in sets[i % len(sets)])
        weights = [m.weight.detach().clone() for component in (pipe.unet, pipe.text_encoder) for m in component.modules()
                   if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
        for a, b in zip(merged.setdefault(i % len(sets), weights), weights):
            assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(merged[0], merged[1]))
    adapters.activate([])
    for name, p in [*pipe.unet.named_parameters(), *pipe.text_encoder.named_parameters()]:
        assert torch.equal(p, snapshot[name]), name


def test_keys_that_do_not_fit_are_named(pipe, tmp_path):
    tensors = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 32),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(32, 2),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_x.lora_A.weight": torch.zeros(2, 32),  # no such layer
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_x.lora_B.weight": torch.zeros(32, 2),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": torch.zeros(2, 768),  # SD 1.5's width
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": torch.zeros(32, 2),
        "unet.down_blocks.0.resnets.0.conv1.lora_A.weight": torch.zeros(2, 32),  # a linear LoRA for a 3x3 convolution
        "unet.down_blocks.0.resnets.0.conv1.lora_B.weight": torch.zeros(32, 2),
        "unet.down_blocks.0.resnets.0.norm1.lora_A.weight": torch.zeros(2, 32),  # not a linear or convolution layer
        "unet.down_blocks.0.resnets.0.norm1.lora_B.weight": torch.zeros(32, 2),
    }
    save_file(tensors, str(tmp_path / "misfit.safetensors"))
    lora = read_lora(tmp_path / "misfit.safetensors", "misfit")
    problems = lora_problems(pipe, lora)
    assert sorted(problems) == sorted(k for k in tensors if k.endswith("lora_A.weight") and "to_q" not in k)
    with pytest.raises(LoRAError, match="to_x"):
        Adapters(pipe).activate([(lora, 1.0)])
    assert lora_problems(pipe, read_lora(write_lora(tmp_path / "fits.safetensors", pipe, {"unet": ["conv_in"]}, kohya=True,
                                                    rank=2, seed=0), "fits")) == []


def test_sha256_is_of_the_files_bytes(lora_files):
    path = lora_files["kohya"]
    assert read_lora(path, "kohya").sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("tensors, message", [
    (None, "cannot read"),
    ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, "neither"),
    ({}, "neither"),
    ({"lora_unet_conv_in.hada_w1_a": torch.zeros(2, 2)}, "unsupported key 'lora_unet_conv_in.hada_w1_a'"),
    ({"unet.conv_in.lora_A.weight": torch.zeros(2, 4, 3, 3)}, "lacks its up weight"),
    ({"unet.conv_in.lora_A.weight": torch.zeros(2, 4), "lora_unet_conv_in.lora_up.weight": torch.zeros(2, 2)}, "neither"),
], ids=["garbage", "a checkpoint", "empty", "LoHa", "half a layer", "mixed formats"])
def test_files_that_are_not_loras_raise_lora_error(tmp_path, tensors, message):
    path = tmp_path / "bad.safetensors"
    if tensors is None:
        path.write_bytes(b"\x00garbage" * 10)
    else:
        save_file(tensors, str(path))
    with pytest.raises(LoRAError, match=message):
        read_lora(path, "bad")
    with pytest.raises(LoRAError, match="cannot read"):
        read_lora(tmp_path / "missing.safetensors", "missing")


def test_compiled_unet_sees_each_merged_set(lora_files):
    pipe = sdcore.load_pipeline("builtin:tiny")
    pipe.compile()
    with pytest.raises(ValueError, match="before Pipeline.compile"):
        Adapters(pipe)
    pipe = sdcore.load_pipeline("builtin:tiny")
    lora = read_lora(write_lora(lora_files["kohya"].parent / "builtin.safetensors", pipe,
                                {"unet": layer_names(pipe, "unet", ATTENTION + CONVS)}, kohya=True, rank=4, seed=5), "b")
    adapters = Adapters(pipe)
    kwargs = dict(steps=2, height=32, width=32, scheduler="ddim", output="latent")
    eager = {}
    for scale in (1.0, 0.0, -1.0):
        adapters.activate([(lora, scale)])
        eager[scale] = pipe.generate(["a fox"], seeds=[3], **kwargs)[0]
    pipe.compile()
    for scale in (1.0, 0.0, -1.0):
        adapters.activate([(lora, scale)])
        torch.testing.assert_close(pipe.generate(["a fox"], seeds=[3], **kwargs)[0], eager[scale], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(eager[1.0], eager[-1.0], atol=1e-2)


@pytest.mark.full_size
def test_full_size_lora_equals_diffusers(full_sd15_folder, tmp_path):
    import gc

    kwargs = dict(steps=2, guidance_scale=7.5, height=64, width=64)
    pipe = sdcore.load_pipeline(str(full_sd15_folder))
    path = write_lora(tmp_path / "full.safetensors", pipe,
                      {"unet": layer_names(pipe, "unet", ATTENTION + CONVS), "text_encoder": layer_names(pipe, "text_encoder", TEXT[:4])},
                      kohya=True, rank=8, seed=6, alpha=4.0)
    Adapters(pipe).activate([(read_lora(path, "full"), 0.7)])
    ours = {output: pipe.generate(PROMPTS[:1], seeds=SEEDS[:1], scheduler="ddim", output=output, **kwargs)[0]
            for output in ("latent", "np")}
    del pipe
    gc.collect()
    reference = reference_pipeline(full_sd15_folder, "ddim")
    reference.load_lora_weights(str(path), adapter_name="full")
    reference.set_adapters(["full"], adapter_weights=[0.7])
    theirs = {output: reference(PROMPTS[:1], num_inference_steps=kwargs["steps"], guidance_scale=kwargs["guidance_scale"],
                                height=kwargs["height"], width=kwargs["width"], output_type=output,
                                generator=torch.Generator("cpu").manual_seed(SEEDS[0])).images[0]
              for output in ("latent", "np")}
    print("full-size latent max diff", (ours["latent"] - theirs["latent"]).abs().max().item())
    torch.testing.assert_close(ours["latent"], theirs["latent"], rtol=1e-3, atol=1e-3)
    image = (theirs["np"] * 255).round().astype(np.uint8)
    print("full-size uint8 max diff", np.abs(ours["np"].astype(int) - image.astype(int)).max())
    assert np.abs(ours["np"].astype(int) - image.astype(int)).max() <= 2
