"""GPU section: images/s of sdcore and diffusers eager in bfloat16 and float16, 512x512, 50 steps,
then sdcore's GPU levers one at a time at the target batch, and the host's waits on the GPU per step.

The fraction of peak divides the work an image takes (bench.flops: about 83 TFLOP for a 50-step
CFG image at 512²) by the time it took; the peak is the card's dense bf16/fp16 tensor rate.

A lent GPU machine gives minutes, not hours: the target batch runs first, every figure is handed to
`save` as soon as it exists (a run stopped at its time limit still leaves what it measured), and a
lever that fails is recorded with its error instead of ending the section.
"""
import time
import warnings

import torch

from bench import fixtures, flops, jobsystem
from bench.timing import interleaved, median, verdict

SKIPPED = "GPU benchmarks skipped: no CUDA device"
# Dense (no sparsity) bf16 / fp16 tensor-core peak, FLOP/s, first matching name wins.
PEAK_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))
PROMPT = "a photograph of an astronaut riding a horse"
# sdcore's GPU levers beyond its eager defaults, each measured alone against the eager figure.
LEVERS = {
    "channels_last": "eager, the UNet's weights (and so its activations) in channels-last memory format",
    "compile": "`Pipeline.compile()` (`--compile`): torch.compile of the UNet",
    "cuda_graphs": '`Pipeline.compile("reduce-overhead")`: compiled, and every step replayed as one CUDA graph',
}
SYNC_SCHEDULERS = ("ddim", "pndm", "dpmpp_2m", "euler_a", "ddpm")
# Issue 6's GPU target (512², 50 steps) on the devices it names: at this batch, sdcore's best (eager or with a
# lever) makes at least this many images/s and this many times diffusers' eager rate.
TARGET_BATCH, TARGET_IMAGES_PER_S, TARGET_SPEEDUP = 16, 6.0, 1.5
TARGET_DEVICES = ("H100", "H200", "H800")  # H100-class


def section(folder, log, *, device: str = "cuda", size: int = 512, steps: int = 50, batches=(16, 8, 1),
            dtypes=(torch.bfloat16, torch.float16), levers=tuple(LEVERS), lever_batches=(16,), reps: int = 3,
            save=lambda figures: None) -> dict:
    """The GPU figures; with another `device` and small sizes it is a quick check of this code.

    Eager sdcore and diffusers for every dtype and batch; the `levers` (LEVERS) at `lever_batches`
    in the first dtype only (each compile takes a minute or more)."""
    if device == "cuda" and not torch.cuda.is_available():
        print(SKIPPED, flush=True)
        return {"skipped": SKIPPED}
    import sdcore

    name = torch.cuda.get_device_name(0) if device == "cuda" else device
    peak = next((rate for key, rate in PEAK_FLOPS if key in name), None)
    per_image = flops.image(size, steps)
    out = {"device": name, "peak_flops": peak, "flops_per_image": per_image, "size": size, "steps": steps,
           "rows": [], "levers": []}

    def rate(seconds: float, batch: int) -> dict:
        per_s = batch / seconds
        return {"images_per_s": per_s, "peak_fraction": per_s * per_image / peak if peak else None}

    def measure(fns: dict, batch: int, label: str) -> dict:
        """Median seconds of each of `fns` (whole images of `batch` rows), after a 2-step warm-up each."""
        for warm in fns.values():
            warm(batch, 2)
        log(f"GPU {label}: whole image x{reps}")
        times = interleaved({lib: (lambda fn=fn: fn(batch, steps)) for lib, fn in fns.items()}, reps,
                            warmup=False, device=device, log=log)
        return {lib: {"s": median(runs), "runs_s": runs, **rate(median(runs), batch)} for lib, runs in times.items()}

    for d, dtype in enumerate(dtypes):
        dname = str(dtype).removeprefix("torch.")
        ours = sdcore.load_pipeline(folder, device=device, dtype=dtype)
        ref = fixtures.load_reference(folder, device=device, dtype=dtype)
        if d == 0 and device == "cuda":
            out["host_syncs_per_step"] = host_syncs_per_step(ours)
            save(out)
        non_finite = {}
        for batch in batches:
            times = measure({"sdcore": generator(ours, size, non_finite), "diffusers": reference(ref, size)}, batch,
                            f"{dname} batch {batch}")
            out["rows"].append({"dtype": dname, "batch": batch, **times, "non_finite_rows": dict(non_finite),
                                "speedup_vs_diffusers": times["diffusers"]["s"] / times["sdcore"]["s"]})
            save(out)
        del ours, ref
        free(device)
        if d > 0:
            continue
        for lever in levers:
            for batch in lever_batches:
                eager = next(r for r in out["rows"] if (r["dtype"], r["batch"]) == (dname, batch))
                row = {"lever": lever, "dtype": dname, "batch": batch}
                try:
                    pipe = sdcore.load_pipeline(folder, device=device, dtype=dtype)
                    apply_lever(pipe, lever)
                    started = time.perf_counter()
                    generator(pipe, size, {})(batch, 2)
                    row["first_call_s"] = time.perf_counter() - started  # the compile, for the compiled levers
                    row |= measure({"sdcore": generator(pipe, size, {})}, batch, f"{dname} batch {batch}, {lever}")["sdcore"]
                    row["vs_eager"] = eager["sdcore"]["s"] / row["s"]
                    row["speedup_vs_diffusers"] = eager["diffusers"]["s"] / row["s"]
                except Exception as e:  # one lever that fails must not cost the others their minutes
                    row["error"] = error_text(e)
                    log(f"GPU {lever} failed: {row['error']}")
                pipe = None
                free(device)
                out["levers"].append(row)
                save(out)
    return out


def error_text(e: Exception) -> str:
    """A failed figure's record: the exception's type and first line."""
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


def generator(pipe, size: int, non_finite: dict):
    """fn(batch, steps): one batch of DDIM whole images from sdcore; NaN rows are counted in `non_finite`."""
    from sdcore.errors import NonFiniteOutputError

    def run(batch: int, steps: int) -> None:
        try:
            pipe.generate([PROMPT] * batch, seeds=list(range(batch)), steps=steps, height=size, width=size,
                          scheduler="ddim", output="np")
        except NonFiniteOutputError as e:  # random weights in half precision; the work was done
            non_finite[batch] = len(e.rows)
    return run


def reference(ref, size: int):
    def run(batch: int, steps: int) -> None:
        gens = [torch.Generator().manual_seed(s) for s in range(batch)]
        ref([PROMPT] * batch, num_inference_steps=steps, height=size, width=size, generator=gens, output_type="np")
    return run


def apply_lever(pipe, lever: str) -> None:
    if lever == "channels_last":
        pipe.unet.to(memory_format=torch.channels_last)
    elif lever == "compile":
        pipe.compile()
    elif lever == "cuda_graphs":
        pipe.compile("reduce-overhead")
    else:
        raise ValueError(f"unknown GPU lever {lever!r}; known: {', '.join(LEVERS)}")


def free(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()


def host_syncs_per_step(pipe, size: int = 64) -> dict:
    """For each scheduler, how often per denoising step the host waits for the GPU (torch's sync debug
    mode counts them): the count at 6 steps minus that at 3, over 3, so that the waits every image has
    once (the prompt's tokens up, the finished image down) drop out. 0 means the host queues step after
    step without waiting."""
    counts = {}
    for scheduler in SYNC_SCHEDULERS:
        seen = []
        for steps in (3, 6):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    pipe.generate([PROMPT] * 2, seeds=[0, 1], steps=steps, height=size, width=size, scheduler=scheduler,
                                  output="latent")
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            seen.append(sum("synchroniz" in str(w.message) for w in caught))
        counts[scheduler] = (seen[1] - seen[0]) / 3
    return counts


def render(g: dict) -> list[str]:
    if "skipped" in g:
        return [f"**{g['skipped']}.**"]
    peak = f"{g['peak_flops'] / 1e12:.0f} TFLOP/s" if g["peak_flops"] else "unknown"

    def pct(x):
        return f"{100 * x:.0f} %" if x is not None else "—"

    lines = []
    if "machine" in g:  # measured on another machine than the rest of the report (run.py --gpu-from)
        m, v = g["machine"], g["versions"]
        lines += [f"Measured apart: `{g['command']}` on {m['date']}, {m['cores']} CPU cores, torch {v['torch']}, diffusers "
                  f"{v['diffusers']}, commit {v['sdbatch_commit']}"
                  + ("; the run stopped before its end, so this is what it had measured." if g["partial"] else "."), ""]
    lines += [f"Device: {g['device']} (dense bf16/fp16 peak {peak}); one image = {g['flops_per_image'] / 1e12:.1f} "
              "TFLOP (counted); DDIM, guidance 7.5, seconds are medians of interleaved runs.", "",
             "| dtype | batch | sdcore images/s | diffusers images/s | speedup | sdcore % of peak | diffusers % of peak |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in g["rows"]:
        ours, ref = row["sdcore"], row["diffusers"]
        lines.append(f"| {row['dtype']} | {row['batch']} | {ours['images_per_s']:.2f} | {ref['images_per_s']:.2f} | "
                     f"**{row['speedup_vs_diffusers']:.2f}** | {pct(ours['peak_fraction'])} | {pct(ref['peak_fraction'])} |")
    lines += ["", target_line(g)]
    bad = [f"{row['dtype']} batch {row['batch']}" for row in g["rows"] if row["non_finite_rows"]]
    if bad:
        lines += ["", f"Non-finite images (random weights in half precision) at: {', '.join(bad)}."]
    if g["levers"]:
        lines += ["", "Levers, each alone on top of sdcore's eager pipeline (first call = the compile, where there "
                  "is one; left out of images/s):", "",
                  "| lever | dtype | batch | images/s | × eager sdcore | speedup vs diffusers eager above | % of peak "
                  "| first call s |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for row in g["levers"]:
            if "error" in row:
                lines.append(f"| {row['lever']} | {row['dtype']} | {row['batch']} | failed: {row['error']} | | | | |")
            else:
                lines.append(f"| {row['lever']} | {row['dtype']} | {row['batch']} | {row['images_per_s']:.2f} | "
                             f"{row['vs_eager']:.2f} | **{row['speedup_vs_diffusers']:.2f}** | {pct(row['peak_fraction'])} | "
                             f"{row['first_call_s']:.0f} |")
        lines += [""] + [f"- `{name}`: {what}" for name, what in LEVERS.items()]
    if "host_syncs_per_step" in g:
        lines += ["", "Host waits for the GPU per denoising step (torch.cuda sync debug mode, 64², batch 2): " + ", ".join(
            f"{name} {n:g}" for name, n in g["host_syncs_per_step"].items()) + "."]
    if "job" in g:
        lines += ["", render_job(g["job"])]
    if g.get("batch_differences"):
        lines += [""] + render_batch_differences(g["batch_differences"])
    return lines


def render_job(j: dict) -> str:
    """bench.gpu_check's job figure: one actor's `sdbatch run` against the loop making the same calls."""
    if "error" in j:
        return f"Job efficiency: failed: {j['error']}."
    ok = j["efficiency"] >= jobsystem.TARGET_EFFICIENCY
    return (f"Job efficiency: `sdbatch run` of {j['images']} images on one actor ({j['dtype']}, {j['rows_per_call']} rows "
            f"a call, shards of {j['shard_size']}) against `bench.loop` making the same calls in one process, "
            f"{j['reps']} run each: steady (each side's start and end left out) job {j['job_steady_images_per_s']:.2f} "
            f"images/s, loop {j['loop_steady_images_per_s']:.2f}: **{100 * j['efficiency']:.0f} %**. End to end: job "
            f"{j['job_end_to_end_s']:.0f} s ({j['job_startup_s']:.0f} s of it starting Ray and loading the model), loop "
            f"{j['loop_end_to_end_s']:.0f} s. Largest pixel difference job − loop: {j['max_pixel_difference']}. "
            f"Target (job ≥ {100 * jobsystem.TARGET_EFFICIENCY:.0f} % of the loop): {verdict(ok)}.")


def render_batch_differences(rows: list[dict]) -> list[str]:
    """bench.gpu_check's rows of a batch made again alone, per dtype."""
    done = next(row for row in rows + [{}] if "error" not in row)
    lines = [f"Same seeds, batch {done.get('batch', '?')} against one row at a time: the first rows of a batch made "
             "again alone, DDIM; how far apart the two images of each seed are (uint8 pixels, any channel).", "",
             "| dtype | rows compared | largest difference (of 255) | pixels that differ |", "|---|---:|---:|---:|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['dtype']} | failed: {row['error']} | | |")
            continue
        share = f"{100 * row['differing_pixels'] / row['pixels']:.2f} %" if row["pixels"] else "—"
        non_finite = f" ({row['non_finite_rows']} non-finite left out)" if row["non_finite_rows"] else ""
        largest = "—" if row["max_abs_uint8"] is None else row["max_abs_uint8"]
        lines.append(f"| {row['dtype']} | {row['rows']}{non_finite} | {largest} | {share} "
                     f"({row['differing_pixels']:,} of {row['pixels']:,}) |")
    return lines


def target_line(g: dict) -> str:
    """The target judged for each dtype on sdcore's fastest figure at TARGET_BATCH: eager, or a lever's."""
    target = (f"Target (H100-class, {g['size']}², {g['steps']} steps, batch {TARGET_BATCH}: ≥ {TARGET_IMAGES_PER_S:g} "
              f"images/s and ≥ {TARGET_SPEEDUP:g} × diffusers eager): ")
    if not any(name in g["device"] for name in TARGET_DEVICES):
        return target + f"not judged on {g['device']}."
    judged = []
    for dtype in dict.fromkeys(row["dtype"] for row in g["rows"]):
        eager = [row for row in g["rows"] if (row["dtype"], row["batch"]) == (dtype, TARGET_BATCH)]
        if not eager:
            continue
        figures = [("eager", eager[0]["sdcore"], eager[0]["speedup_vs_diffusers"])] + [
            (row["lever"], row, row["speedup_vs_diffusers"]) for row in g["levers"]
            if (row["dtype"], row["batch"]) == (dtype, TARGET_BATCH) and "error" not in row]
        how, best, speedup = max(figures, key=lambda figure: figure[1]["images_per_s"])
        ok = best["images_per_s"] >= TARGET_IMAGES_PER_S and speedup >= TARGET_SPEEDUP
        peak = f"{100 * best['peak_fraction']:.0f} % of peak" if best["peak_fraction"] is not None else "peak unknown"
        judged.append(f"{dtype} {verdict(ok)} ({how}: {best['images_per_s']:.2f} images/s, {speedup:.2f} × diffusers "
                      f"eager, {peak})")
    return target + (", ".join(judged) or f"batch {TARGET_BATCH} not measured") + "."
