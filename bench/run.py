"""`make bench` = `python -m bench.run`: sdcore against diffusers on the same random SD v1.5 weights.

Writes BENCHMARKS.md (bench/intro.md, then the generated tables, then bench/levers.md) and
BENCHMARKS.json (every run's seconds; generated, not committed) at the top of the repository. `--help` lists the knobs; the
defaults are what BENCHMARKS.md reports: 21-28 minutes on 2 Zen 4 cores, as the shared host's load goes.
"""
import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch

from bench import fixtures, flops, gpu, jobsystem, levers
from bench.timing import child_json, interleaved, machine, median, verdict, versions
from sdcore import cpu, weights
from sdcore.allocator import keep_freed_memory

REPO = Path(__file__).resolve().parents[1]
# Issue 6's targets for this report's CPU figures: sdcore's whole image at most this × diffusers' time;
# a cold start no slower than diffusers' `from_pretrained` on the folder, with a peak memory after first
# use at most this × the weights. The targets are judged on unrounded figures.
CPU_TARGET_RATIO = 0.8
COLD_START_TARGET_MEMORY = 1.2
# sdcore's CPU kernels are kept only if a whole image runs at least this much faster with them.
KERNELS_TARGET_SPEEDUP = 1.10
# The cold start's two layouts of the same weights.
FOLDER, SINGLE_FILE = "diffusers folder", "single .safetensors"
GPU_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
PROMPTS = ["a photograph of an astronaut riding a horse", "a watercolour of a lighthouse at dawn",
           "a bowl of ramen, studio lighting", "an isometric city block at night"]


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=256, help="CPU image side in pixels (default 256)")
    p.add_argument("--steps", type=int, default=20, help="CPU denoising steps (default 20)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4], help="CPU batch sizes (default 1 4)")
    p.add_argument("--reps", type=int, default=5, help="repetitions of text encoding and batch-1 UNet steps")
    p.add_argument("--slow-reps", type=int, default=2, help="repetitions of larger UNet batches and VAE decodes")
    p.add_argument("--image-reps", type=int, nargs="+", default=[2, 1],
                   help="repetitions of the whole image, one number per batch size (default 2 1)")
    p.add_argument("--compile-reps", type=int, default=1,
                   help="repetitions of each whole image with --compile (default 1)")
    p.add_argument("--compile-batches", type=int, nargs="+", default=[1],
                   help="batch sizes (of --batches) of the whole images with --compile (default 1)")
    p.add_argument("--lever-reps", type=int, default=3, help="repetitions of each lever A/B")
    p.add_argument("--kernel-steps", type=int, default=20,
                   help="denoising steps of the whole images with sdcore's CPU kernels on and off (default 20)")
    p.add_argument("--kernel-reps", type=int, default=3,
                   help="repetitions of the whole image with sdcore's CPU kernels on and off (default 3)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="leave out sdcore with --compile (torch.compile: a few minutes of compiling)")
    p.add_argument("--cold-reps", type=int, default=3, help="fresh processes per cold-start measurement")
    p.add_argument("--cache", type=Path, default=fixtures.DEFAULT_CACHE, help="where the random weights are kept")
    p.add_argument("--sections", nargs="+", default=["cold", "cpu", "kernels", "levers", "jobs", "gpu"],
                   choices=["cold", "cpu", "kernels", "levers", "jobs", "gpu"],
                   help="e.g. `--sections kernels` for the whole image with sdcore's CPU kernels on and off alone")
    p.add_argument("--gpu-dtypes", nargs="+", default=["bf16", "fp16"], choices=list(GPU_DTYPES),
                   help="GPU dtypes, in order; the levers run in the first (default bf16 fp16)")
    p.add_argument("--gpu-batches", type=int, nargs="+", default=[16, 8, 1], help="GPU batch sizes (default 16 8 1)")
    p.add_argument("--gpu-levers", nargs="*", default=list(gpu.LEVERS), choices=list(gpu.LEVERS),
                   help=f"GPU levers, measured at the largest GPU batch in the first dtype (default all: {' '.join(gpu.LEVERS)})")
    p.add_argument("--gpu-reps", type=int, default=3, help="repetitions of each GPU figure")
    p.add_argument("--out", type=Path, default=REPO / "BENCHMARKS", help="output path without suffix (.md, .json)")
    p.add_argument("--render-only", action="store_true",
                   help="measure nothing: write the .md again from the .json (after editing bench/*.md)")
    p.add_argument("--gpu-from", type=Path, metavar="JSON",
                   help="with --render-only: take the GPU section from this run's JSON (one made on a GPU machine)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.render_only:
        base = args.out.with_suffix(".json")
        gpu_run = json.loads(args.gpu_from.read_text()) if args.gpu_from else None
        if base.exists():
            result = json.loads(base.read_text())
        elif gpu_run:  # no earlier run here: the report is the GPU run's alone
            log(f"no {base}: the report holds the GPU run alone")
            result = {k: gpu_run[k] for k in ("command", "machine", "versions", "weights_bytes", "total_s") if k in gpu_run}
        else:
            raise SystemExit(f"--render-only: no {base} to render (make bench writes it)")
        if gpu_run:
            result["gpu"] = {**gpu_run["gpu"], "command": gpu_run["command"], "machine": gpu_run["machine"],
                             "versions": gpu_run["versions"], "partial": gpu_run.get("partial", False)}
            write_json(args.out, result)
        args.out.with_suffix(".md").write_text(render(result))
        return result
    if len(args.image_reps) != len(args.batches):
        raise SystemExit("--image-reps needs one number per --batches entry")
    if not set(args.compile_batches) <= set(args.batches):
        raise SystemExit("--compile-batches compares with the eager whole images: take its sizes from --batches")
    started = time.perf_counter()
    allocator = keep_freed_memory() + ", for both libraries"
    given = sys.argv[1:] if argv is None else argv
    command = "python -m bench.run " + " ".join(given) if given else "make bench (python -m bench.run)"
    result = {"command": command, "machine": machine(), "versions": versions(), "allocator": allocator,
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    log(f"{result['machine']['cpu']}, {result['machine']['cores']} cores, torch threads "
        f"{result['machine']['torch_threads']}, load average {result['machine']['load_average_at_start']}")
    folder, single = fixtures.ensure_weights(args.cache, log=log)
    result["weights_bytes"] = sum(f.stat().st_size for f in folder.rglob("*.safetensors"))

    # Fresh processes first, while this one is still small.
    if "cold" in args.sections:
        result["cold_start"] = cold_start(folder, single, args.cold_reps)
    if {"cpu", "kernels", "levers"} & set(args.sections):
        ours, ref = load_both(folder) if "cpu" in args.sections else (load_ours(folder), None)
        if "cpu" in args.sections:
            result["cpu"] = cpu_section(ours, ref, args)
        if "kernels" in args.sections:
            result["cpu_kernels"] = kernels_section(ours, args)
        if "levers" in args.sections:
            result["levers"] = lever_section(ours, args)
        if "cpu" in args.sections and args.compile:
            result["cpu_compiled"] = compiled_section(ours, result["cpu"], args)
        del ours, ref
    if "jobs" in args.sections:
        result["jobs"] = jobsystem.section(folder, args.cache.parent / "jobs", log)
    if "gpu" in args.sections:
        # Written after every GPU figure too: a lent GPU's minutes may run out before the section ends.
        result["gpu"] = gpu.section(
            folder, log, dtypes=[GPU_DTYPES[d] for d in args.gpu_dtypes], batches=args.gpu_batches,
            levers=args.gpu_levers, lever_batches=[max(args.gpu_batches)], reps=args.gpu_reps,
            save=lambda figures: write_json(args.out, {**result, "gpu": figures, "partial": True}))
    result["total_s"] = time.perf_counter() - started

    write_json(args.out, result)
    args.out.with_suffix(".md").write_text(render(result))
    log(f"wrote {args.out.with_suffix('.md')} and .json in {result['total_s'] / 60:.1f} min")
    return result


def write_json(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")


# --- cold start -----------------------------------------------------------------------------------

def cold_start(folder: Path, single: Path, reps: int) -> list[dict]:
    cases = [(FOLDER, "sdcore", [folder]), (FOLDER, "diffusers", [folder]), (SINGLE_FILE, "sdcore", [single]),
             # diffusers reads the configs of a single file from a folder; it converts every tensor.
             (SINGLE_FILE, "diffusers", [single, folder])]
    rows = []
    for layout, library, paths in cases:
        runs = []
        # diffusers' single-file load takes tens of seconds and twice the weights' memory: once is enough.
        for _ in range(1 if (library, layout) == ("diffusers", SINGLE_FILE) else reps):
            run, _ = child_json(["-m", "bench.coldstart", library, *map(str, paths)], f"cold start {library} {layout}",
                                timeout=900)
            runs.append(run)
            log(f"cold start {layout} {library}: load {runs[-1]['load_s']:.2f}s, "
                f"peak RSS {runs[-1]['peak_rss_after_first_use'] / 2**30:.2f} GiB after first use")
        row = {"layout": layout, "library": library, "runs": runs}
        for key in runs[0]:
            row[key] = median([run[key] for run in runs])
        rows.append(row)
    return rows


# --- CPU: components and whole images ---------------------------------------------------------------

def load_ours(folder: Path):
    import sdcore

    return sdcore.load_pipeline(folder)


def load_both(folder: Path):
    return load_ours(folder), fixtures.load_reference(folder)


def cpu_section(ours, ref, args) -> dict:
    side = args.size // 8
    rows, parity = [], {}
    gen = torch.Generator().manual_seed(0)
    for batch in args.batches:
        prompts = (PROMPTS * batch)[:batch]
        negatives = [""] * batch
        cfg_batch = 2 * batch
        x = torch.randn(cfg_batch, 4, side, side, generator=gen)
        t = torch.tensor(500)
        ctx = torch.randn(cfg_batch, 77, ours.unet.config.cross_attention_dim, generator=gen)
        z = torch.randn(batch, 4, side, side, generator=gen)
        figures = [
            ("text encoding (prompt + negative)", None, args.reps, 2 * batch * flops.text_encode(),
             lambda: (ours.encode_prompts(negatives), ours.encode_prompts(prompts)),
             lambda: ref.encode_prompt(prompts, "cpu", 1, True)),
            (f"one UNet step (CFG batch {cfg_batch})", f"unet_b{batch}", args.reps if batch == 1 else args.slow_reps,
             cfg_batch * flops.unet_row(args.size),
             lambda: ours.unet(x, t, ctx), lambda: ref.unet(x, t, encoder_hidden_states=ctx).sample),
            ("VAE decode", f"vae_b{batch}", args.slow_reps, batch * flops.vae_decode(args.size),
             lambda: ours.vae.decode(z), lambda: ref.vae.decode(z).sample),
        ]
        for name, parity_key, reps, work, fn_ours, fn_ref in figures:
            log(f"CPU batch {batch}: {name} x{reps}")
            shares, outputs = {}, {}
            # The timed calls' own outputs give the parity figure: no extra call of either library.
            timed = {lib: (lambda lib=lib, fn=fn: outputs.__setitem__(lib, fn()))
                     for lib, fn in (("sdcore", fn_ours), ("diffusers", fn_ref))}
            with torch.inference_mode():
                times = interleaved(timed, reps, log=log, shares=shares)
            if parity_key:
                parity[parity_key] = (outputs["sdcore"] - outputs["diffusers"]).abs().max().item()
            rows.append(_row(name, batch, times, shares, work))

    images = {}
    for batch, reps in zip(args.batches, args.image_reps):
        def run_ours(steps=args.steps):
            images["sdcore"] = whole_image(ours, batch, args, steps)

        def run_ref(steps=args.steps):
            gens = [torch.Generator().manual_seed(s) for s in range(batch)]
            images["diffusers"] = ref((PROMPTS * batch)[:batch], num_inference_steps=steps, guidance_scale=7.5,
                                      generator=gens, output_type="pil", height=args.size, width=args.size).images

        fns = {"sdcore": run_ours, "diffusers": run_ref}
        # The components above ran every kernel, but not a whole image's pattern of allocations, whose first
        # page faults would fall in the first timed image. One step of each, untimed, keeps them out.
        log(f"CPU batch {batch}: a one-step image of each, untimed; then whole images ({args.steps} steps) x{reps}")
        for fn in fns.values():
            fn(1)
        shares = {}
        times = interleaved(fns, reps, warmup=False, log=log, shares=shares)
        name, work = f"whole image ({args.steps} steps + decode)", batch * flops.image(args.size, args.steps)
        rows.append(_row(name, batch, times, shares, work))
        parity[f"image_b{batch}_max_abs_uint8"] = max(
            int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())
            for a, b in zip(images["sdcore"], images["diffusers"]))
    return {"rows": rows, "parity": parity, "threads": torch.get_num_threads(),
            "matmul_peak_flops": flops.cpu_matmul_peak()}


def whole_image(pipe, batch: int, args, steps: int | None = None) -> list:
    return pipe.generate((PROMPTS * batch)[:batch], seeds=list(range(batch)), steps=steps or args.steps, guidance_scale=7.5,
                         scheduler="ddim", output="pil", height=args.size, width=args.size)


def plain_twin(pipe):
    """A pipeline over the same weight tensors (no copy) with plain PyTorch modules, no CPU kernels."""
    modules = weights.on_meta({c: getattr(pipe, c).config for c in weights.COMPONENTS})
    for c, module in modules.items():
        module.load_state_dict(getattr(pipe, c).state_dict(), assign=True)
        module.eval().requires_grad_(False)
    twin = dataclasses.replace(pipe, **modules)
    cpu.accelerate(twin, None)
    return twin


def kernels_section(ours, args) -> dict:
    """sdcore's whole image, batch 1, float32, with its CPU kernels (sdcore.cpu) and with plain PyTorch
    modules, interleaved: what the kernels must earn (issue 28: at least 10 % faster)."""
    variants = {"kernels on": ours, "kernels off": plain_twin(ours)}
    steps = args.kernel_steps
    # Untimed one-step images first: the kernels' transformed weights are made on first use.
    log(f"CPU kernels on/off: a one-step image of each, untimed; then whole images ({steps} steps) x{args.kernel_reps}")
    for pipe in variants.values():
        whole_image(pipe, 1, args, 1)
    shares = {}
    times = interleaved({name: (lambda pipe=pipe: whole_image(pipe, 1, args, steps)) for name, pipe in variants.items()},
                        args.kernel_reps, warmup=False, log=log, shares=shares)
    on, off = median(times["kernels on"]), median(times["kernels off"])
    return {"size": args.size, "steps": steps, "on_s": on, "off_s": off, "speedup": off / on, "runs_s": times,
            "min_cpu_share": min(min(v) for v in shares.values()), "threads": torch.get_num_threads()}


def render_kernels(k: dict) -> list[str]:
    runs = len(k["runs_s"]["kernels on"])
    return [f"## CPU kernels on vs off — whole image {k['size']}², float32", "",
            f"sdcore's whole image (batch 1, {k['steps']} DDIM steps + decode, guidance 7.5, seed 0) with its CPU "
            "kernels (`sdcore.cpu.accelerate`, as every CPU pipeline is built) against the same pipeline with plain "
            "PyTorch modules over the same weights; interleaved, seconds, median of "
            f"{runs} runs each, {k['threads']} torch threads, lowest CPU share {k['min_cpu_share']:.2f}.", "",
            "| variant | s | runs |", "|---|---:|---|",
            *[f"| {name} | {median(ts):.2f} | {', '.join(f'{t:.2f}' for t in ts)} |" for name, ts in k["runs_s"].items()],
            "",
            f"Kernels off ÷ on: **{k['speedup']:.2f}** × ({abs(1 - k['on_s'] / k['off_s']):.0%} "
            f"{'less' if k['on_s'] <= k['off_s'] else 'more'} time with the kernels). "
            f"Target (kept only if at least 1.10 ×, issue 28): {verdict(k['speedup'] >= KERNELS_TARGET_SPEEDUP)}.", ""]


def compiled_section(ours, cpu: dict, args) -> dict:
    """sdcore after `Pipeline.compile()` (the `--compile` option): the compile, one UNet step against
    the eager UNet (interleaved), and whole images against diffusers' medians of section 1."""
    ours.compile()
    log("CPU --compile: the first call compiles the UNet")
    # Inference tensors, as generate makes under inference_mode: the compiled UNet's guards tell them
    # from ordinary tensors, and would compile it a second time.
    with torch.inference_mode():
        side = args.size // 8
        gen = torch.Generator().manual_seed(2)
        x = torch.randn(2, 4, side, side, generator=gen)
        ctx = torch.randn(2, 77, ours.unet.config.cross_attention_dim, generator=gen)
        t = torch.tensor(500)
        started = time.perf_counter()
        compiled_out = ours.predict_noise(x, t, ctx)
        compile_s = time.perf_counter() - started
        largest_difference = (compiled_out - ours.unet(x, t, ctx)).abs().max().item()
        log(f"CPU --compile: compiled in {compile_s:.0f}s; one UNet step x{args.reps}")
        step = interleaved({"compiled": lambda: ours.predict_noise(x, t, ctx), "eager": lambda: ours.unet(x, t, ctx)},
                           args.reps, warmup=False, log=log)
    rows = []
    reps = args.compile_reps
    for batch in args.compile_batches:
        log(f"CPU --compile batch {batch}: whole image ({args.steps} steps) x{reps}")
        times = interleaved({"compiled": lambda: whole_image(ours, batch, args)}, reps, warmup=False, log=log)
        eager = next(r for r in cpu["rows"] if r["figure"].startswith("whole image") and r["batch"] == batch)
        compiled_s = median(times["compiled"])
        rows.append({"batch": batch, "compiled_s": compiled_s, "runs_s": times["compiled"],
                     "eager_s": eager["sdcore_s"], "diffusers_s": eager["diffusers_s"],
                     "ratio": compiled_s / eager["diffusers_s"]})
    return {"compile_s": compile_s, "unet_largest_difference": largest_difference,
            "step_compiled_s": median(step["compiled"]), "step_eager_s": median(step["eager"]), "step_runs_s": step,
            "whole_images": rows}


def _row(name: str, batch: int, times: dict, shares: dict, work: int) -> dict:
    ours, ref = median(times["sdcore"]), median(times["diffusers"])
    return {"figure": name, "batch": batch, "sdcore_s": ours, "diffusers_s": ref, "ratio": ours / ref,
            "flops": work, "sdcore_flops_per_s": work / ours, "diffusers_flops_per_s": work / ref,
            "ratio_fastest": min(times["sdcore"]) / min(times["diffusers"]), "reps": len(times["sdcore"]),
            "sdcore_runs_s": times["sdcore"], "diffusers_runs_s": times["diffusers"],
            "min_cpu_share": min(min(shares["sdcore"]), min(shares["diffusers"])),
            "cpu_shares": shares}


def lever_section(ours, args) -> list[dict]:
    side = args.size // 8
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, side, side, generator=gen)
    ctx = torch.randn(2, 77, ours.unet.config.cross_attention_dim, generator=gen)
    ids = ours.tokenizer([PROMPTS[0]])
    t = torch.tensor(500)
    workloads = {
        f"UNet step, CFG batch 2, {args.size}²": (ours.unet, lambda: ours.unet(x, t, ctx)),
        "text encoder, 1 prompt": (ours.text_encoder, lambda: ours.text_encoder(ids)),
    }
    return levers.measure(workloads, args.lever_reps, log)


# --- report ---------------------------------------------------------------------------------------

def render_compiled(c: dict, s: dict) -> list[str]:
    step_reps = len(c["step_runs_s"]["compiled"])
    lines = ["### sdcore with `--compile`", "",
             "`Pipeline.compile()`, the `--compile` option of `sdbatch run` and `generate`: the UNet through "
             "torch.compile, its weights frozen into the compiled code on the CPU. Whole images after the "
             "compile, against diffusers' medians in the table above (same run and process, not interleaved).", "",
             f"- Compile: {c['compile_s']:.0f} s, paid on the first step of every new shape (batch, height, width) "
             "in each new process.",
             f"- One UNet step (CFG batch 2), interleaved with the eager UNet, median of {step_reps}: "
             f"{c['step_compiled_s']:.3f} s against {c['step_eager_s']:.3f} s "
             f"(**{c['step_compiled_s'] / c['step_eager_s']:.2f}** × eager); largest difference of the outputs "
             f"{c['unet_largest_difference']:.1e}.", "",
             "| figure | batch | sdcore --compile s | sdcore eager s | diffusers s | ratio to diffusers | runs |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for w in c["whole_images"]:
        lines.append(f"| whole image ({s['steps']} steps + decode) | {w['batch']} | {w['compiled_s']:.3f} | "
                     f"{w['eager_s']:.3f} | {w['diffusers_s']:.3f} | **{w['ratio']:.2f}** | {len(w['runs_s'])} |")
    lines += ["", _whole_image_target("Target with `--compile`", c["whole_images"]), ""]
    return lines


def _whole_image_target(label: str, whole_images: list[dict]) -> str:
    return f"{label} (sdcore whole image ≤ {CPU_TARGET_RATIO} × diffusers): " + ", ".join(
        f"batch {w['batch']} {verdict(w['ratio'] <= CPU_TARGET_RATIO)} ({w['ratio']:.2f})" for w in whole_images) + "."


def _rows_together(rows: list[dict]) -> list[str]:
    """What a batch's rows gain from sharing the UNet's calls, from the UNet steps measured in the table."""
    steps = {row["batch"]: row["sdcore_s"] for row in rows if row["figure"].startswith("one UNet step")}
    if 1 not in steps:
        return []
    return [f"Rows together: sdcore's UNet step for the {b} rows of a batch (CFG batch {2 * b}), the call `generate` "
            f"makes on the CPU, took {steps[b]:.2f} s against {b} × {steps[1]:.2f} s for the rows one at a time "
            f"({steps[b] / (b * steps[1]) - 1:+.0%}), each image to the same bytes as alone."
            for b in sorted(steps) if b > 1]


def _cold_start_target(r: dict) -> str:
    """Judged on the whole peak after the first use, its kernels included; the larger images' kernels, which
    come on top, are the CPU actors' cost, set out in the section's text and in the README."""
    reference = next(row for row in r["cold_start"] if (row["library"], row["layout"]) == ("diffusers", FOLDER))
    judged = []
    for row in r["cold_start"]:
        if row["library"] != "sdcore":
            continue
        memory = row["peak_rss_after_first_use"] / r["weights_bytes"]
        ok = row["load_s"] <= reference["load_s"] and memory <= COLD_START_TARGET_MEMORY
        judged.append(f"{row['layout']} {verdict(ok)} ({row['load_s']:.2f} s, {memory:.2f} ×)")
    return (f"Target (load no slower than diffusers' `from_pretrained` on the folder, {reference['load_s']:.2f} s; peak "
            f"memory after the first use ≤ {COLD_START_TARGET_MEMORY} × the weights, before the kernels of 256² and "
            "larger images): " + ", ".join(judged) + ".")


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def render(r: dict) -> str:
    m, v = r["machine"], r["versions"]
    out = [(REPO / "bench" / "intro.md").read_text().rstrip(), ""]
    out += [
        "## This run", "",
        f"- Command: `{r['command']}` " + (f"(took {r['total_s'] / 60:.1f} min)" if "total_s" in r else
                                           "(stopped before the end: the figures it had measured)"),
        f"- Date: {m['date']}",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, torch threads {m['torch_threads']}"
        f"{', GPU ' + m['gpu'] if m.get('gpu') else ', no GPU'}; load average at start {m['load_average_at_start']}"
        " (the machine is shared: figures are medians of interleaved runs)",
        f"- Versions: torch {v['torch']}, diffusers {v['diffusers']}, transformers {v['transformers']}, "
        f"sdbatch {v['sdbatch']} (commit {v['sdbatch_commit']}), Python {m['python']}",
    ]
    if "allocator" in r:
        out.append(f"- Memory allocator: {r['allocator']}, as in sdbatch's CPU actors and `sdbatch generate` (without it, "
                   "page faults on freed activations make the same figure swing between runs)")
    out += [
        f"- Weights: random SD v1.5 (UNet, VAE, CLIP text encoder: {_gib(r['weights_bytes'])} of float32), "
        "the same files for both libraries", "",
    ]
    if "cpu" in r:
        s = r["settings"]
        out += [f"## 1. Model, same weights — CPU, float32, {s['size']}×{s['size']}, {s['steps']} DDIM steps, "
                "guidance 7.5", "",
                "Seconds, median of the runs shown; ratio = sdcore / diffusers (below 1: sdcore is faster).", "",
                "Lowest CPU share: of all the figure's runs, the least CPU time this process got per second "
                "and thread; below about 0.8 other processes took the cores during that run.", "",
                "GFLOP/s: the figure's matmul, convolution and attention work (counted, `bench/flops.py`) over "
                f"its median time. This machine's ceiling, measured in the same run: a 3072³ float32 matmul at "
                f"**{r['cpu']['matmul_peak_flops'] / 1e9:.0f} GFLOP/s** on {r['cpu']['threads']} threads; "
                "a library at that rate has nothing left to gain from faster kernels on these cores.", "",
                "| figure | batch | sdcore s | diffusers s | ratio | ratio of fastest runs | sdcore GFLOP/s | "
                "diffusers GFLOP/s | runs | lowest CPU share |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in r["cpu"]["rows"]:
            out.append(f"| {row['figure']} | {row['batch']} | {row['sdcore_s']:.3f} | {row['diffusers_s']:.3f} | "
                       f"**{row['ratio']:.2f}** | {row['ratio_fastest']:.2f} | {row['sdcore_flops_per_s'] / 1e9:.0f} | "
                       f"{row['diffusers_flops_per_s'] / 1e9:.0f} | {row['reps']} | {row['min_cpu_share']:.2f} |")
        whole = [row for row in r["cpu"]["rows"] if row["figure"].startswith("whole image")]
        out += ["", "Whole image per image: " + ", ".join(
            f"batch {w['batch']}: sdcore {w['sdcore_s'] / w['batch']:.1f} s, diffusers {w['diffusers_s'] / w['batch']:.1f} s"
            for w in whole) + ".",
            _whole_image_target("Target", whole)]
        out += _rows_together(r["cpu"]["rows"])
        few = [f"{w['reps']} × at batch {w['batch']}" for w in whole if w["reps"] < 3]
        if few:
            out.append(f"Whole images ran {', '.join(few)} for each library (the time budget of `make bench`).")
        p = r["cpu"]["parity"]
        out += ["", "Same numbers, not just the same speed: largest difference sdcore − diffusers, " + ", ".join(
            f"{k.replace('_', ' ')} {val:.1e}" if isinstance(val, float) else f"{k.replace('_', ' ')} {val}"
            for k, val in p.items()) + ".", ""]
    if "cpu_compiled" in r:
        out += render_compiled(r["cpu_compiled"], r["settings"])
    if "cpu_kernels" in r:
        out += render_kernels(r["cpu_kernels"])
    if "cold_start" in r:
        out += ["## 2. Cold start — weights on disk → ready pipeline (fresh process each)", "",
                f"Weights: {_gib(r['weights_bytes'])}. Load = the load call alone (median of the runs; the page "
                "cache is warm, as on a second start); import = importing the library first. Peak RSS counts "
                "memory-mapped pages as they are touched, so the column after a first use (one text encoding, "
                "one small UNet call and VAE decode, which read every weight) is the honest one. Of it, sdcore's "
                "kept kernels: the transformed kernels its convolutions make on their first call at a map size "
                "where Winograd's algorithm runs, and keep (`bench/levers.md`); this first use, on an 8×8 latent, "
                "makes few of them; an image of 256² or more makes them all (UNet 3.45 GiB, VAE 0.31 GiB). "
                "× weights: peak RSS after first use without the kept kernels, the memory the loading itself "
                "costs.", "",
                "| layout | library | load s | import s | peak RSS ready | peak RSS after first use | of it, kept kernels "
                "| × weights | runs |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for row in r["cold_start"]:
            kernels = row["kernels_made_bytes"]
            out.append(f"| {row['layout']} | {row['library']} | {row['load_s']:.2f} | {row['import_s']:.2f} | "
                       f"{_gib(row['peak_rss_ready'])} | {_gib(row['peak_rss_after_first_use'])} | {_gib(kernels)} | "
                       f"{(row['peak_rss_after_first_use'] - kernels) / r['weights_bytes']:.2f} | {len(row['runs'])} |")
        out += ["", "diffusers has no single-file loader that reads as fast as `from_pretrained`; its "
                "`from_single_file` (configs from the folder) is shown for the same file.", _cold_start_target(r), ""]
    if "jobs" in r:
        out += ["## 3. Job system", ""] + jobsystem.render(r["jobs"]) + [""]
    if "gpu" in r:
        g = r["gpu"]
        shape = f" — {g['size']}×{g['size']}, {g['steps']} steps" if "size" in g else ""
        out += [f"## 4. GPU{shape}", ""] + gpu.render(g) + [""]
    if "levers" in r:
        out += ["## Levers", "",
                "Measured in this run: sdcore's modules with every lever, then with one lever switched back to "
                "plain PyTorch, then with none (interleaved; seconds, median).", "",
                "| workload | variant | s | × time of all levers | runs |", "|---|---|---:|---:|---:|"]
        for row in r["levers"]:
            out.append(f"| {row['workload']} | {row['variant']} | {row['median_s']:.3f} | "
                       f"{row['slowdown_vs_all']:.2f} | {len(row['runs_s'])} |")
        # The levers this run measured, which a later re-render's code may no longer have.
        measured = dict.fromkeys(row["variant"].removeprefix("without ") for row in r["levers"]
                                 if row["variant"] not in ("all levers", "without any"))
        out += [""] + [f"- `{name}`: {levers.LEVERS[name][0] if name in levers.LEVERS else 'since dropped (bench/levers.md)'}"
                       for name in measured]
        out += ["", (REPO / "bench" / "levers.md").read_text().rstrip(), ""]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
