"""GPU section: images/s of sdcore and diffusers eager in bfloat16 and float16, 512x512, 50 steps.

The fraction of peak divides the work an image takes (bench.flops: about 83 TFLOP for a 50-step
CFG image at 512²) by the time it took; the peak is the card's dense bf16/fp16 tensor rate.
"""
import time

import torch

from bench import fixtures, flops
from bench.timing import interleaved, median

SKIPPED = "GPU benchmarks skipped: no CUDA device"
# Dense (no sparsity) bf16 / fp16 tensor-core peak, FLOP/s, first matching name wins.
PEAK_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))


def section(folder, log, *, device: str = "cuda", size: int = 512, steps: int = 50, batches=(1, 8, 16),
            compile_batches=(16,), dtypes=(torch.bfloat16, torch.float16), reps: int = 3) -> dict:
    """The GPU figures; with another `device` and small sizes it is a quick check of this code.

    `compile_batches`: the batches measured again after `Pipeline.compile()` (each compile takes a
    minute or more, so only the target's batch by default)."""
    if device == "cuda" and not torch.cuda.is_available():
        print(SKIPPED, flush=True)
        return {"skipped": SKIPPED}
    import sdcore
    from sdcore.errors import NonFiniteOutputError

    name = torch.cuda.get_device_name(0) if device == "cuda" else device
    peak = next((rate for key, rate in PEAK_FLOPS if key in name), None)
    per_image = flops.image(size, steps)
    out = {"device": name, "peak_flops": peak, "flops_per_image": per_image, "size": size, "steps": steps, "rows": []}
    prompt = "a photograph of an astronaut riding a horse"

    def run_ours(pipe, batch, non_finite, n=steps):
        try:
            pipe.generate([prompt] * batch, seeds=list(range(batch)), steps=n, height=size, width=size,
                          scheduler="ddim", output="np")
        except NonFiniteOutputError as e:  # random weights in half precision; the work was done
            non_finite["sdcore"] = len(e.rows)

    def run_ref(ref, batch, n=steps):
        gens = [torch.Generator().manual_seed(s) for s in range(batch)]
        ref([prompt] * batch, num_inference_steps=n, height=size, width=size, generator=gens, output_type="np")

    def add_rates(row, variant):
        """`{variant}_images_per_s` and `{variant}_peak_fraction` from the row's `{variant}_s`."""
        row[f"{variant}_images_per_s"] = row["batch"] / row[f"{variant}_s"]
        row[f"{variant}_peak_fraction"] = row[f"{variant}_images_per_s"] * per_image / peak if peak else None

    for dtype in dtypes:
        dname = str(dtype).removeprefix("torch.")
        ours = sdcore.load_pipeline(folder, device=device, dtype=dtype)
        ref = fixtures.load_reference(folder, device=device, dtype=dtype)
        rows = {}
        for batch in batches:
            non_finite = {}
            # Kernels, allocator and autotuning warmed up, at little cost.
            run_ours(ours, batch, non_finite, 2)
            run_ref(ref, batch, 2)
            log(f"GPU {dname} batch {batch}: whole image x{reps}")
            times = interleaved({"sdcore": lambda: run_ours(ours, batch, non_finite), "diffusers": lambda: run_ref(ref, batch)},
                                reps, warmup=False, device=device, log=log)
            row = rows[batch] = {"dtype": dname, "batch": batch, "sdcore_s": median(times["sdcore"]),
                                 "diffusers_s": median(times["diffusers"]), "runs_s": times, "non_finite_rows": non_finite}
            for lib in ("sdcore", "diffusers"):
                add_rates(row, lib)
            row["speedup_vs_diffusers"] = row["diffusers_s"] / row["sdcore_s"]
        ours.compile()
        for batch in [b for b in compile_batches if b in rows]:
            row = rows[batch]
            log(f"GPU {dname} batch {batch}: compile, then whole image x{reps}")
            started = time.perf_counter()
            run_ours(ours, batch, row["non_finite_rows"], 2)
            row["compile_s"] = time.perf_counter() - started
            times = interleaved({"compiled": lambda: run_ours(ours, batch, row["non_finite_rows"])}, reps,
                                warmup=False, device=device, log=log)
            row["compiled_s"] = median(times["compiled"])
            row["runs_s"]["compiled"] = times["compiled"]
            add_rates(row, "compiled")
            row["compiled_speedup_vs_diffusers"] = row["diffusers_s"] / row["compiled_s"]
        out["rows"] += rows.values()
        del ours, ref
        if device == "cuda":
            torch.cuda.empty_cache()
    return out


def render(g: dict) -> list[str]:
    if "skipped" in g:
        return [f"**{g['skipped']}.**"]
    peak = f"{g['peak_flops'] / 1e12:.0f} TFLOP/s" if g["peak_flops"] else "unknown"

    def pct(x):
        return f"{100 * x:.0f} %" if x is not None else "—"

    lines = [f"Device: {g['device']} (dense bf16/fp16 peak {peak}); one image = {g['flops_per_image'] / 1e12:.1f} "
             "TFLOP (counted). `--compile`: after `Pipeline.compile()` (torch.compile of the UNet), compile time "
             "left out.", "",
             "| dtype | batch | sdcore images/s | diffusers images/s | speedup | sdcore % of peak | diffusers % of peak "
             "| sdcore --compile images/s | --compile speedup | --compile % of peak | compile s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in g["rows"]:
        compiled = (f"{row['compiled_images_per_s']:.2f} | **{row['compiled_speedup_vs_diffusers']:.2f}** | "
                    f"{pct(row['compiled_peak_fraction'])} | {row['compile_s']:.0f}") if "compiled_s" in row else "— | — | — | —"
        lines.append(f"| {row['dtype']} | {row['batch']} | {row['sdcore_images_per_s']:.2f} | "
                     f"{row['diffusers_images_per_s']:.2f} | **{row['speedup_vs_diffusers']:.2f}** | "
                     f"{pct(row['sdcore_peak_fraction'])} | {pct(row['diffusers_peak_fraction'])} | {compiled} |")
    bad = [f"{row['dtype']} batch {row['batch']}" for row in g["rows"] if row["non_finite_rows"]]
    if bad:
        lines += ["", f"Non-finite images (random weights in half precision) at: {', '.join(bad)}."]
    return lines
