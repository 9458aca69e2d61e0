"""Loading weights: both published layouts, builtin:tiny, and clear failures for anything else.

Random reference weights (diffusers / transformers) are written to disk in each layout and loaded
through `sdcore.load_pipeline`; the loaded components must reproduce the reference's outputs. The
single-file layout is written from our own modules through the inverse of `single_file_names`, and
diffusers' own LDM converters must map that file back onto the reference weights exactly.
"""
import gc
import json
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import sdcore
from reference import (SD15, TINY_CLIP, TINY_UNET, TINY_VAE, reference_text_encoder, reference_unet, reference_vae,
                       sd15_config, write_clip_vocab_folder)
from sdcore import builtin, weights
from sdcore import configs as config_readers
from sdcore.errors import UnsupportedModelError, WeightsError
from sdcore.tokenizer import Tokenizer

PROMPTS = ["a photograph of an astronaut riding a horse", "Ünïcode, emoji 🐈 and   SPACES!"]
COMPONENTS = ("unet", "vae", "text_encoder")


# --- writing the layouts ------------------------------------------------------------------------

def write_folder_extras(root: Path):
    """model_index.json, scheduler and tokenizer files exactly as the SD v1.5 release has them."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(SD15 / "model_index.json", root / "model_index.json")
    (root / "scheduler").mkdir(exist_ok=True)
    shutil.copy(SD15 / "scheduler" / "scheduler_config.json", root / "scheduler")
    write_clip_vocab_folder(root / "tokenizer")
    shutil.copy(SD15 / "tokenizer" / "tokenizer_config.json", root / "tokenizer")


def write_saved_folder(root: Path, refs: dict) -> Path:
    """A diffusers folder as today's `save_pretrained` writes it."""
    write_folder_extras(root)
    for c in COMPONENTS:
        refs[c].save_pretrained(root / c)
    return root


def write_variant_folder(src: Path, root: Path, *, legacy: bool, suffix: str, dtype=torch.float32) -> Path:
    """A copy of folder `src` whose weight files are rewritten, e.g. as the fp16 variant or `.bin` pickles.

    `legacy` spells names as the 2022 release did: the VAE attention as query/key/value/proj_attn, and
    the text encoder with `text_model.` and its position_ids buffer.
    """
    shutil.copytree(src, root, ignore=shutil.ignore_patterns("*.safetensors"))
    for c in COMPONENTS:
        old = next((src / c).glob("*.safetensors"))
        state = {k: v.to(dtype) for k, v in load_file(old).items()}
        if legacy and c == "vae":
            renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
            for ours, theirs in renames.items():
                state = {k.replace(ours, theirs) if "mid_block.attentions" in k else k: v for k, v in state.items()}
        if legacy and c == "text_encoder":
            state = {"text_model." + k.removeprefix("text_model."): v for k, v in state.items()}
            state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
        stem = "model" if c == "text_encoder" else "diffusion_pytorch_model"
        if c == "text_encoder" and suffix.endswith(".bin"):
            stem = "pytorch_model"
        name = stem + suffix
        if name.endswith(".safetensors"):
            save_file(state, root / c / name)
        else:
            torch.save(state, root / c / name)
    return root


def single_file_state(pipe, configs: dict) -> dict[str, torch.Tensor]:
    """Our modules' weights under their original LDM names, shaped as the original files store them."""
    state, ours_by_component = {}, {c: getattr(pipe, c).state_dict() for c in COMPONENTS}
    for original, (c, ours) in weights.single_file_names(**configs).items():
        t = ours_by_component[c][ours]
        if ".mid.attn_1." in original and t.ndim == 2:
            t = t[:, :, None, None]  # the original VAE attention is made of 1x1 convs
        state[original] = t.contiguous()
    # What else real files carry, to be skipped: CLIP's position buffer, an EMA bookkeeping entry,
    # the noise schedule.
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    state["model_ema.num_updates"] = torch.tensor(470000)
    state["alphas_cumprod"] = torch.linspace(0.999, 0.005, 1000)
    return state


def write_single_file(state: dict, path: Path, *, nested: bool = True) -> Path:
    if path.suffix == ".safetensors":
        save_file(state, path)
    else:  # Lightning's layout: the weights under "state_dict", next to plain numbers
        torch.save({"state_dict": state, "global_step": 470000} if nested else state, path)
    return path


# --- comparing with the reference ---------------------------------------------------------------

def reference_configs(unet: dict, vae: dict, clip: dict) -> dict:
    return {"unet": unet, "vae": vae, "text_encoder": clip}


def our_configs(configs: dict) -> dict:
    return {
        "unet": config_readers.unet_config(configs["unet"]),
        "vae": config_readers.vae_config(configs["vae"]),
        "text_encoder": config_readers.clip_config(configs["text_encoder"]),
    }


def make_inputs(configs: dict, latent_hw=(8, 8)) -> dict:
    gen = torch.Generator().manual_seed(7)
    return {
        "ids": Tokenizer.default()(PROMPTS),
        "sample": torch.randn(2, 4, *latent_hw, generator=gen),
        "timesteps": torch.tensor([999, 1]),
        "context": torch.randn(2, 77, configs["unet"]["cross_attention_dim"], generator=gen),
        "z": torch.randn(1, 4, *latent_hw, generator=gen),
    }


@torch.no_grad()
def reference_outputs(refs: dict, x: dict) -> dict:
    return {
        "text": refs["text_encoder"](x["ids"]).last_hidden_state,
        "unet": refs["unet"](x["sample"], x["timesteps"], encoder_hidden_states=x["context"]).sample,
        "pixels": refs["vae"].decode(x["z"]).sample,
    }


@torch.no_grad()
def assert_matches_reference(pipe, x: dict, expected: dict):
    assert torch.equal(pipe.tokenizer(PROMPTS), x["ids"])
    checks = {
        "text": (pipe.text_encoder(x["ids"]), 1e-4),
        "unet": (pipe.unet(x["sample"], x["timesteps"], x["context"]), 1e-4),
        "pixels": (pipe.vae.decode(x["z"]), 1e-3),
    }
    for name, (got, tol) in checks.items():
        assert got.shape == expected[name].shape, name
        assert expected[name].abs().max() > 0.1, name  # not a comparison of two near-zero tensors
        diff = (got - expected[name]).abs().max().item()
        assert diff <= tol, f"{name}: max abs diff {diff}"


def assert_diffusers_converters_agree(single_file: Path, configs: dict, reference_state: Callable):
    """diffusers' LDM converters map our single file exactly onto the reference weights."""
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)

    checkpoint = load_file(single_file)
    converted = {
        "unet": convert_ldm_unet_checkpoint(checkpoint, configs["unet"]),
        "vae": convert_ldm_vae_checkpoint(checkpoint, configs["vae"]),
        # transformers 5 names the text model's weights without `text_model.`
        "text_encoder": {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(checkpoint).items()
                         if k != "text_model.embeddings.position_ids"},
    }
    for c in COMPONENTS:
        expected = reference_state(c)
        assert converted[c].keys() == expected.keys(), c
        for k, v in expected.items():
            assert converted[c][k].shape == v.shape and torch.equal(converted[c][k], v), f"{c}: {k}"


# --- tiny config: the fast suite ----------------------------------------------------------------

TINY = reference_configs(TINY_UNET, TINY_VAE, TINY_CLIP)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    refs = {"unet": reference_unet(TINY_UNET), "vae": reference_vae(TINY_VAE), "text_encoder": reference_text_encoder(TINY_CLIP)}
    inputs = make_inputs(TINY)
    folder = write_saved_folder(root / "folder", refs)
    pipe = sdcore.load_pipeline(folder)
    state = single_file_state(pipe, our_configs(TINY))
    return SimpleNamespace(
        root=root, refs=refs, inputs=inputs, expected=reference_outputs(refs, inputs), folder=folder, state=state,
        single=write_single_file(state, root / "tiny.safetensors"),
    )


def load_tiny_single_file(path: Path, **kwargs):
    """Single files carry no config; load_pipeline assumes SD v1.5's, these are tiny."""
    return weights.load_single_file(path, configs=our_configs(TINY), **kwargs)


def test_folder_matches_reference(tiny):
    pipe = sdcore.load_pipeline(tiny.folder)
    assert_matches_reference(pipe, tiny.inputs, tiny.expected)
    assert pipe.source == str(tiny.folder)
    assert pipe.device == torch.device("cpu") and pipe.dtype == torch.float32
    assert pipe.scheduler_config == {k: v for k, v in sd15_config("scheduler").items() if not k.startswith("_")}
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())


@pytest.mark.parametrize("name, nested", [("tiny.safetensors", True), ("tiny.ckpt", True), ("plain.ckpt", False)])
def test_single_file_matches_reference(tiny, name, nested):
    path = tiny.single if name == "tiny.safetensors" else write_single_file(tiny.state, tiny.root / name, nested=nested)
    pipe = load_tiny_single_file(path)
    assert_matches_reference(pipe, tiny.inputs, tiny.expected)
    assert pipe.scheduler_config == weights.SD15_SCHEDULER_CONFIG
    assert pipe.fingerprint.startswith("sha256:")


def test_single_file_with_older_text_encoder_prefix(tiny):
    # Some SD 1.x files were saved by older transformers, without `text_model.` under the transformer.
    old = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
           for k, v in tiny.state.items()}
    pipe = load_tiny_single_file(write_single_file(old, tiny.root / "old_clip.safetensors"))
    assert_matches_reference(pipe, tiny.inputs, tiny.expected)


def test_inpainting_unet_is_detected_in_both_layouts(tiny, tmp_path):
    inpainting = reference_configs({**TINY_UNET, "in_channels": 9}, TINY_VAE, TINY_CLIP)
    refs = {**tiny.refs, "unet": reference_unet(inpainting["unet"])}
    folder = sdcore.load_pipeline(write_saved_folder(tmp_path / "folder", refs))
    path = write_single_file(single_file_state(folder, our_configs(inpainting)), tmp_path / "inpainting.safetensors")
    single = load_tiny_single_file(path)  # told the text-to-image UNet's 4 input channels, as SD v1.5's are assumed
    assert not sdcore.load_pipeline(tiny.folder).inpainting_unet
    for pipe in (folder, single):
        assert pipe.inpainting_unet and pipe.unet.config.in_channels == 9 and pipe.unet.config.out_channels == 4
    x = {**tiny.inputs, "sample": torch.randn(2, 9, 8, 8, generator=torch.Generator().manual_seed(5))}
    with torch.no_grad():
        expected = refs["unet"](x["sample"], x["timesteps"], encoder_hidden_states=x["context"]).sample
        for pipe in (folder, single):
            assert (pipe.unet(x["sample"], x["timesteps"], x["context"]) - expected).abs().max() <= 1e-4


def test_diffusers_converters_map_our_single_file_onto_reference(tiny):
    def reference_state(c):
        return tiny.refs[c].state_dict()

    assert_diffusers_converters_agree(tiny.single, TINY, reference_state)


def test_single_file_names_cover_every_parameter_once():
    table = weights.single_file_names(weights.UNetConfig(), weights.VAEConfig(), weights.CLIPTextConfig())
    modules = weights.on_meta({"unet": weights.UNetConfig(), "vae": weights.VAEConfig(), "text_encoder": weights.CLIPTextConfig()})
    assert sorted(table.values()) == sorted((c, k) for c, m in modules.items() for k in m.state_dict())
    # Spot checks against names in the published v1-5-pruned-emaonly file.
    assert table["model.diffusion_model.input_blocks.3.0.op.weight"] == ("unet", "down_blocks.0.downsamplers.0.conv.weight")
    assert table["model.diffusion_model.output_blocks.2.1.conv.bias"] == ("unet", "up_blocks.0.upsamplers.0.conv.bias")
    assert table["model.diffusion_model.output_blocks.5.2.conv.weight"] == ("unet", "up_blocks.1.upsamplers.0.conv.weight")
    assert table["model.diffusion_model.middle_block.2.emb_layers.1.weight"] == ("unet", "mid_block.resnets.1.time_emb_proj.weight")
    assert table["model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"] == (
        "unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight")
    assert table["first_stage_model.decoder.up.1.block.0.nin_shortcut.weight"] == ("vae", "decoder.up_blocks.2.resnets.0.conv_shortcut.weight")
    assert table["first_stage_model.encoder.mid.attn_1.proj_out.weight"] == ("vae", "encoder.mid_block.attentions.0.to_out.0.weight")
    assert table["cond_stage_model.transformer.text_model.final_layer_norm.bias"] == ("text_encoder", "final_layer_norm.bias")


@pytest.mark.parametrize("variant", ["fp16_safetensors", "bin_2022_names", "fp16_bin"])
def test_folder_variants_load(tiny, variant):
    suffix, dtype, legacy = {
        "fp16_safetensors": (".fp16.safetensors", torch.float16, False),
        "bin_2022_names": (".bin", torch.float32, True),
        "fp16_bin": (".fp16.bin", torch.float16, True),
    }[variant]
    folder = write_variant_folder(tiny.folder, tiny.root / variant, legacy=legacy, suffix=suffix, dtype=dtype)
    pipe = sdcore.load_pipeline(folder)
    assert all(p.dtype == torch.float32 for p in pipe.unet.parameters())
    if dtype == torch.float32:
        assert_matches_reference(pipe, tiny.inputs, tiny.expected)
    for c in COMPONENTS:
        loaded = getattr(pipe, c).state_dict()
        for k, v in tiny.refs[c].state_dict().items():
            assert torch.equal(loaded[k], v.to(dtype).float()), f"{c}: {k}"


def test_folder_picks_the_variant_of_the_dtype(tiny):
    fp16_only = write_variant_folder(tiny.folder, tiny.root / "fp16_only", legacy=False, suffix=".fp16.safetensors",
                                     dtype=torch.float16)
    both = tiny.root / "fp32_and_fp16"
    shutil.copytree(fp16_only, both)
    for c in COMPONENTS:
        for f in (tiny.folder / c).glob("*.safetensors"):
            shutil.copy(f, both / c)
    pipe = sdcore.load_pipeline(both)
    assert pipe.fingerprint == sdcore.load_pipeline(tiny.folder).fingerprint
    assert pipe.fingerprint != sdcore.load_pipeline(fp16_only).fingerprint
    assert_matches_reference(pipe, tiny.inputs, tiny.expected)
    for half in (torch.float16, torch.bfloat16):
        assert (sdcore.load_pipeline(both, dtype=half).fingerprint
                == sdcore.load_pipeline(fp16_only, dtype=half).fingerprint
                != sdcore.load_pipeline(tiny.folder, dtype=half).fingerprint)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype(tiny, dtype):
    for pipe in (sdcore.load_pipeline(tiny.folder, dtype=dtype), load_tiny_single_file(tiny.single, dtype=dtype),
                 sdcore.load_pipeline("builtin:tiny", dtype=dtype)):
        assert pipe.dtype == dtype
        for module in (pipe.unet, pipe.vae, pipe.text_encoder):
            assert {p.dtype for p in module.parameters()} == {dtype}
    with torch.no_grad():
        context = pipe.text_encoder(pipe.tokenizer(["a cat"]))
        assert context.dtype == dtype and torch.isfinite(context).all()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU"))])
def test_half_dtype_load_is_the_float32_load_converted(tiny, device):
    full_pipe = sdcore.load_pipeline(tiny.folder)
    full = {c: getattr(full_pipe, c).state_dict() for c in COMPONENTS}
    for dtype in (torch.bfloat16, torch.float16):
        for pipe in (sdcore.load_pipeline(tiny.folder, device=device, dtype=dtype),
                     load_tiny_single_file(tiny.single, device=device, dtype=dtype)):
            for c in COMPONENTS:
                for k, v in getattr(pipe, c).state_dict().items():
                    assert v.device.type == device and v.dtype == dtype, f"{c}: {k}"
                    assert torch.equal(v.cpu(), full[c][k].to(dtype)), f"{c}: {k}"


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path.resolve())):
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            ranges.append((start, end))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_float32_safetensors_are_not_copied(tiny):
    # Loaded as stored, the parameters are views of the memory-mapped file: the model is never held twice.
    pipe = load_tiny_single_file(tiny.single)
    ranges = _mapped_ranges(tiny.single)
    assert ranges
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        for name, p in module.named_parameters():
            assert any(start <= p.data_ptr() < end for start, end in ranges), name


def test_fingerprint(tiny):
    a, b = sdcore.load_pipeline(tiny.folder), sdcore.load_pipeline(tiny.folder)
    assert a.fingerprint == b.fingerprint and a.fingerprint.startswith("sha256:")
    # Same weights, other config: another model.
    other = tiny.root / "other_scheduler"
    shutil.copytree(tiny.folder, other)
    config = json.loads((other / "scheduler" / "scheduler_config.json").read_text())
    (other / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "steps_offset": 0}))
    assert sdcore.load_pipeline(other).fingerprint != a.fingerprint
    # Other weights of the same names and shapes (the fingerprint samples the data, so a change to
    # a few numbers could go unseen; a fine-tune changes all of them).
    changed = write_single_file({k: v * 2 for k, v in tiny.state.items()}, tiny.root / "changed.safetensors")
    assert load_tiny_single_file(changed).fingerprint != load_tiny_single_file(tiny.single).fingerprint


def test_folder_without_vocabulary_or_scheduler_uses_defaults(tiny):
    folder = tiny.root / "bare"
    shutil.copytree(tiny.folder, folder, ignore=shutil.ignore_patterns("tokenizer", "scheduler", "model_index.json"))
    pipe = sdcore.load_pipeline(folder)
    assert pipe.tokenizer is Tokenizer.default()
    assert pipe.scheduler_config == weights.SD15_SCHEDULER_CONFIG
    assert_matches_reference(pipe, tiny.inputs, tiny.expected)


# --- builtin:tiny -------------------------------------------------------------------------------

def test_builtin_tiny_is_fast_deterministic_and_honest():
    sdcore.load_pipeline("builtin:tiny")  # imports and the tokenizer's vocabulary are one-time costs
    start = time.perf_counter()
    a = sdcore.load_pipeline("builtin:tiny")
    assert time.perf_counter() - start < 2.0  # ~0.3 s; generous for a loaded shared machine
    b = sdcore.load_pipeline("builtin:tiny")
    assert a.fingerprint == b.fingerprint == "builtin:tiny/v1" and a.source == "builtin:tiny"
    for c in COMPONENTS:
        sa, sb = getattr(a, c).state_dict(), getattr(b, c).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.tokenizer is Tokenizer.default()
    assert a.scheduler_config == weights.SD15_SCHEDULER_CONFIG
    assert "noise" in builtin.__doc__.splitlines()[0]
    # Pinned numbers: the same weights on every machine and every run.
    assert a.unet.conv_in.weight.flatten()[:3].tolist() == pytest.approx(BUILTIN_UNET_CONV_IN_HEAD, abs=1e-6)


BUILTIN_UNET_CONV_IN_HEAD = [-0.004613781813532114, -0.0624174065887928, 0.10995455831289291]


def test_builtin_tiny_is_the_reference_architecture():
    # The package's tiny configs are the tests' (which the model tests prove against the reference)...
    for mine, theirs in ((builtin.TINY_UNET, TINY_UNET), (builtin.TINY_VAE, TINY_VAE), (builtin.TINY_CLIP, TINY_CLIP)):
        assert {k: theirs[k] for k in mine} == mine
    # ...and its weights give the reference models' outputs.
    pipe = sdcore.load_pipeline("builtin:tiny")
    refs = {"unet": reference_unet(TINY_UNET), "vae": reference_vae(TINY_VAE), "text_encoder": reference_text_encoder(TINY_CLIP)}
    for c in COMPONENTS:
        refs[c].load_state_dict(getattr(pipe, c).state_dict(), strict=True)
    x = make_inputs(TINY)
    assert_matches_reference(pipe, x, reference_outputs(refs, x))


def test_unknown_builtin():
    with pytest.raises(WeightsError, match="unknown built-in model 'builtin:huge'.*builtin:tiny"):
        sdcore.load_pipeline("builtin:huge")


# --- bad input ----------------------------------------------------------------------------------

def test_missing_path(tmp_path):
    with pytest.raises(WeightsError, match="no such file or directory"):
        sdcore.load_pipeline(tmp_path / "nope.safetensors")


def test_not_a_weight_file(tmp_path):
    (tmp_path / "weights.txt").write_text("hello")
    with pytest.raises(WeightsError, match="expected a diffusers folder or a .safetensors / .ckpt file"):
        sdcore.load_pipeline(tmp_path / "weights.txt")


@pytest.mark.parametrize("missing", ["unet", "vae", "text_encoder"])
def test_folder_missing_component(tiny, missing):
    folder = tiny.root / f"no_{missing}"
    shutil.copytree(tiny.folder, folder, ignore=shutil.ignore_patterns(missing), dirs_exist_ok=True)
    with pytest.raises(WeightsError, match=f"not a complete diffusers folder: it has no {missing}/ "
                                           r"\(model_index.json names a StableDiffusionPipeline\)"):
        sdcore.load_pipeline(folder)


def test_component_folder_instead_of_pipeline_folder(tiny):
    with pytest.raises(WeightsError, match="no unet/, vae/, text_encoder/; it looks like a single component's folder"):
        sdcore.load_pipeline(tiny.folder / "unet")


def test_folder_without_weight_file(tiny):
    folder = tiny.root / "no_weights"
    shutil.copytree(tiny.folder, folder, ignore=shutil.ignore_patterns("diffusion_pytorch_model*"), dirs_exist_ok=True)
    with pytest.raises(WeightsError, match=r"unet: no weight file \(looked for diffusion_pytorch_model.safetensors, "):
        sdcore.load_pipeline(folder)


def test_truncated_safetensors(tiny, tmp_path):
    data = tiny.single.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"cut.safetensors: truncated: [\d,]+ bytes, but its header describes"):
        load_tiny_single_file(cut)
    cut.write_bytes(data[:100])  # inside the header
    with pytest.raises(WeightsError, match="cut.safetensors: truncated, or not a safetensors file"):
        sdcore.load_pipeline(cut)


def test_truncated_file_in_folder(tiny):
    folder = tiny.root / "cut_folder"
    shutil.copytree(tiny.folder, folder)
    unet_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    unet_file.write_bytes(unet_file.read_bytes()[:-10])
    with pytest.raises(WeightsError, match="unet/diffusion_pytorch_model.safetensors: truncated"):
        sdcore.load_pipeline(folder)


def test_truncated_ckpt(tiny, tmp_path):
    data = write_single_file(tiny.state, tmp_path / "whole.ckpt").read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(WeightsError, match="cut.ckpt: not a readable PyTorch checkpoint; truncated or corrupt"):
        sdcore.load_pipeline(cut)


class TrainerState:  # stands for the Lightning callback objects some old .ckpt files carry
    pass


def test_ckpt_with_python_objects_is_refused_without_running_them(tiny, tmp_path):
    path = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": tiny.state, "callbacks": TrainerState()}, path)
    with pytest.raises(WeightsError, match=r"holds Python objects other than tensors.*weights_only=True.*convert it to .safetensors"):
        sdcore.load_pipeline(path)


def test_single_file_with_missing_and_unexpected_keys(tiny, tmp_path):
    state = dict(tiny.state)
    del state["model.diffusion_model.out.2.bias"]
    del state["first_stage_model.decoder.up.0.block.2.conv2.weight"]
    state["model.diffusion_model.extra.weight"] = torch.zeros(3)
    path = write_single_file(state, tmp_path / "broken.safetensors")
    with pytest.raises(WeightsError) as e:
        load_tiny_single_file(path)
    assert str(e.value) == (
        f"{path}: the weights do not fit the given configs. "
        "unet: 1 missing (model.diffusion_model.out.2.bias); 1 unexpected (model.diffusion_model.extra.weight). "
        "vae: 1 missing (first_stage_model.decoder.up.0.block.2.conv2.weight)"
    )


def test_single_file_of_other_size_names_the_shape_mismatches(tiny):
    # load_pipeline assumes SD v1.5's config for a single file: the tiny one does not fit it.
    with pytest.raises(WeightsError) as e:
        sdcore.load_pipeline(tiny.single)
    message = str(e.value)
    assert message.startswith(f"{tiny.single}: the weights do not fit SD v1.5's architecture (a single file carries no config). unet: ")
    assert re.search(r"\d+ with the wrong shape \(model.diffusion_model.time_embed.0.weight is \[128, 32\], expected \[1280, 320\], ", message)
    assert ". vae: " in message and ". text_encoder: " in message


def test_folder_weights_that_do_not_fit_the_config(tiny):
    folder = tiny.root / "mismatch"
    shutil.copytree(tiny.folder, folder)
    _edit_json(folder / "unet" / "config.json", cross_attention_dim=32)
    with pytest.raises(WeightsError, match=re.escape(
            f"{folder}: the weights do not fit the folder's config.json files. unet: 32 with the wrong shape "
            "(down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight is [32, 64], expected [32, 32], ")):
        sdcore.load_pipeline(folder)


def _unet(key: str) -> str:
    return "model.diffusion_model." + key


CLIP_L = {"cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,)}
SD1_UNET = {_unet("input_blocks.0.0.weight"): (320, 4, 3, 3),
            _unet("input_blocks.1.1.proj_in.weight"): (320, 320, 1, 1),
            _unet("input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"): (320, 768)}
OTHER_FAMILIES = {
    "sd2_openclip": ({**SD1_UNET, "cond_stage_model.model.positional_embedding": (77, 1024)},
                     "Stable Diffusion 2.x (an OpenCLIP text encoder"),
    "sd2_context": ({**SD1_UNET, **CLIP_L, _unet("input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"): (320, 1024)},
                    "Stable Diffusion 2.x (cross-attention to a 1024-wide text context; SD 1.x: 768)"),
    "sd2_linear": ({**SD1_UNET, **CLIP_L, _unet("input_blocks.1.1.proj_in.weight"): (320, 320)},
                   "Stable Diffusion 2.x (linear proj_in"),
    "sdxl": ({**SD1_UNET, "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,),
              _unet("label_emb.0.0.weight"): (1280, 2816)}, "SDXL"),
    "instruct_pix2pix": ({**SD1_UNET, **CLIP_L, _unet("input_blocks.0.0.weight"): (320, 8, 3, 3)},
                         "an InstructPix2Pix model (8 UNet input channels"),
    "lora": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320, 1, 1)}, "a LoRA / adapter file"),
    "vae_only": ({"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_out.weight": (3, 128, 3, 3)}, "a standalone VAE"),
}


@pytest.mark.parametrize("family", sorted(OTHER_FAMILIES))
@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_of_another_family_is_refused(tmp_path, family, suffix):
    shapes, expected = OTHER_FAMILIES[family]
    path = write_single_file({k: torch.zeros(s) for k, s in shapes.items()}, tmp_path / f"{family}{suffix}")
    with pytest.raises(UnsupportedModelError, match=re.escape(expected)) as e:
        sdcore.load_pipeline(path)
    assert "sdbatch supports Stable Diffusion 1.x only" in str(e.value)


def _edit_json(path: Path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("family", ["sdxl", "sd3", "sd2_unet", "sd2_text_encoder", "instruct_pix2pix"])
def test_folder_of_another_family_is_refused(tiny, family):
    folder = tiny.root / f"family_{family}"
    shutil.copytree(tiny.folder, folder)
    if family == "sdxl":
        shutil.copytree(folder / "text_encoder", folder / "text_encoder_2")
        _edit_json(folder / "model_index.json", _class_name="StableDiffusionXLPipeline")
        expected = r"looks like SDXL \(StableDiffusionXLPipeline\): it has a second text encoder"
    elif family == "sd3":
        (folder / "unet").rename(folder / "transformer")
        _edit_json(folder / "model_index.json", _class_name="StableDiffusion3Pipeline")
        expected = r"looks like a diffusion-transformer model \(StableDiffusion3Pipeline\)"
    elif family == "sd2_unet":
        _edit_json(folder / "unet" / "config.json", cross_attention_dim=1024, use_linear_projection=True)
        expected = "Stable Diffusion 2.x"
    elif family == "sd2_text_encoder":
        _edit_json(folder / "text_encoder" / "config.json", hidden_act="gelu", hidden_size=1024)
        expected = "Stable Diffusion 2.x"
    else:
        _edit_json(folder / "unet" / "config.json", in_channels=8)
        expected = "8 input / 4 output channels"
    with pytest.raises(UnsupportedModelError, match=expected):
        sdcore.load_pipeline(folder)


# --- full SD v1.5 size --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """Both layouts of a random full-size SD v1.5, written once; the reference freed after its outputs."""
    root = tmp_path_factory.mktemp("sd15")
    configs = reference_configs(sd15_config("unet"), sd15_config("vae"), sd15_config("text_encoder"))
    refs = {"unet": reference_unet(configs["unet"]), "vae": reference_vae(configs["vae"]),
            "text_encoder": reference_text_encoder(configs["text_encoder"])}
    inputs = make_inputs(configs)
    expected = reference_outputs(refs, inputs)
    folder = write_saved_folder(root / "folder", refs)
    del refs
    gc.collect()
    # The single file is made from our modules as loaded from the folder (memory-mapped, no copy).
    pipe = sdcore.load_pipeline(folder)
    single = write_single_file(single_file_state(pipe, our_configs(configs)), root / "v1-5-random.safetensors")
    del pipe
    gc.collect()
    yield SimpleNamespace(configs=configs, inputs=inputs, expected=expected, folder=folder, single=single)
    shutil.rmtree(root)  # 8.6 GB; pytest would keep it with its last few temporary folders


@pytest.mark.full_size
def test_full_size_folder_matches_reference(full):
    pipe = sdcore.load_pipeline(full.folder)
    counts = [sum(p.numel() for p in getattr(pipe, c).parameters()) for c in COMPONENTS]
    assert counts == [859_520_964, 83_653_863, 123_060_480]
    assert_matches_reference(pipe, full.inputs, full.expected)


@pytest.mark.full_size
def test_full_size_single_file_matches_reference(full):
    pipe = sdcore.load_pipeline(full.single)  # SD v1.5's config, as for the published file
    assert_matches_reference(pipe, full.inputs, full.expected)


@pytest.mark.full_size
@pytest.mark.parametrize("few_threads", [2], indirect=True)  # CI's count; a CPU actor's one is the tiny models' test
@pytest.mark.parametrize("height, width", [
    (256, 256),  # 1280-channel convolutions on 8x8 maps, where the matmul meets Winograd's algorithm
    (128, 64),  # maps of 2x1 positions at the deepest level
])
def test_full_size_denoising_gives_a_row_the_same_latents_in_any_batch(full, few_threads, height, width):
    pipe = sdcore.load_pipeline(full.folder)
    prompts, seeds = ["a red fox in the snow", "a lighthouse", "two cups of tea"], [11, 12, 13]
    kwargs = dict(steps=1, height=height, width=width, scheduler="euler_a", output="latent")
    together = pipe.generate(prompts, seeds=seeds, **kwargs)
    for prompt, seed, batched in zip(prompts, seeds, together):
        assert torch.equal(pipe.generate([prompt], seeds=[seed], **kwargs)[0], batched)


@pytest.mark.full_size
def test_full_size_diffusers_converters_map_our_single_file_onto_reference(full):
    def reference_state(c):  # what the reference saved with save_pretrained
        return load_file(next((full.folder / c).glob("*.safetensors")))

    assert_diffusers_converters_agree(full.single, full.configs, reference_state)


def test_source_checks_before_loading(tmp_path):
    (tmp_path / "unet").mkdir()
    assert weights.missing_components(tmp_path) == ["vae/", "text_encoder/"]
    for c in ("vae", "text_encoder"):
        (tmp_path / c).mkdir()
    assert weights.missing_components(tmp_path) == []
    assert weights.is_folder_listing(["model_index.json", "v1-5.safetensors"])
    assert weights.is_folder_listing(["vae/config.json"])
    assert not weights.is_folder_listing(["v1-5.safetensors", "unet/readme.md"])
