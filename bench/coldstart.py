"""One cold start in this (fresh) process: weights on disk -> ready pipeline, then a first use.

`python -m bench.coldstart {sdcore|diffusers} PATH [CONFIG_FOLDER]` prints one JSON line. run.py
starts it as a child once per measurement, so the peak RSS is that of the load alone. The import
of the library is timed apart: it is paid once per process whatever the weights.

"Ready" RSS counts only pages touched so far; memory-mapped weights that are not touched until
first use are not in it, so the peak after a first use (a text encoding, a UNet call on an 8x8
latent and a VAE decode, which read every weight) is reported too, with the part of it that is
sdcore's transformed convolution kernels, made on first use and kept (`sdcore.cpu.FastConv3x3`).
"""
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main(library: str, path: str, config_folder: str | None = None) -> dict:
    t0 = time.perf_counter()
    import torch

    from bench.timing import peak_rss_bytes, rss_bytes

    if library == "sdcore":
        import sdcore

        def load():
            return sdcore.load_pipeline(path)

        def first_use(p):
            ctx = p.text_encoder(p.tokenizer(["a cat"]))
            p.unet(torch.zeros(1, 4, 8, 8), 500, ctx)
            p.vae.decode(torch.zeros(1, 4, 8, 8))
    else:
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()

        def load():
            if os.path.isdir(path):
                return StableDiffusionPipeline.from_pretrained(path, safety_checker=None, local_files_only=True)
            return StableDiffusionPipeline.from_single_file(path, config=config_folder, safety_checker=None,
                                                           local_files_only=True)

        def first_use(p):
            ids = p.tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
            ctx = p.text_encoder(ids)[0]
            p.unet(torch.zeros(1, 4, 8, 8), 500, encoder_hidden_states=ctx)
            p.vae.decode(torch.zeros(1, 4, 8, 8))

    import_s = time.perf_counter() - t0
    rss_before = rss_bytes()
    t1 = time.perf_counter()
    pipe = load()
    ready_s = time.perf_counter() - t1
    peak_ready = peak_rss_bytes()
    t2 = time.perf_counter()
    with torch.inference_mode():
        first_use(pipe)
    first_use_s = time.perf_counter() - t2
    return {"import_s": import_s, "load_s": ready_s, "rss_before_load": rss_before, "peak_rss_ready": peak_ready,
            "first_use_s": first_use_s, "peak_rss_after_first_use": peak_rss_bytes(),
            "kernels_made_bytes": made_kernel_bytes(pipe) if library == "sdcore" else 0}


def made_kernel_bytes(pipe) -> int:
    """Bytes of what sdcore's convolutions made from their weights so far (Winograd's kernels)."""
    from sdcore import cpu

    return cpu.made_kernel_bytes([pipe.unet, pipe.vae])


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:])))
