"""The GPU check: one short run on a lent GPU machine (`bash bench/gpu_check.sh`), whose JSON
`python -m bench.run --render-only --gpu-from` turns into BENCHMARKS.md's GPU section.

On the benchmark's random SD v1.5 weights (bench.fixtures, written once), with DDIM:
1. sdcore against diffusers eager, same weights, 512², 50 steps, fp16 and bf16, batch 16 and 1, and
   sdcore with `--compile` at batch 16 (bench.gpu.section);
2. a 64-image `sdbatch run` on one actor against the in-process loop making the same calls
   (bench.jobsystem.compare): the job's efficiency;
3. for each dtype, the first rows of a batch of 16 made again one at a time with the same seeds: how
   far apart their pixels are, which is what the README's claim about GPU images across batches rests on.

Every figure goes to the JSON as soon as it exists ("partial" until the end), so a run stopped at the
device's time limit leaves what it measured; a part that fails is recorded with its error and the next
one runs. `--cpu-dry-run` runs the same code on the CPU at tiny sizes (a tiny random model, 64², 2
steps, batches 2 and 1), to check it end to end before a GPU is lent.
"""
import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench import fixtures, gpu, jobsystem
from bench.run import log, write_json
from bench.timing import machine, versions
from jobs.devices import DTYPES


@dataclasses.dataclass(frozen=True)
class Plan:
    device: str
    size: int
    steps: int
    batches: tuple[int, ...]  # the first: the levers', the job's and the batch its rows alone are compared with
    dtypes: tuple[torch.dtype, ...]  # the levers and the job run in the first
    reps: int
    levers: tuple[str, ...]
    job_images: int
    rows_alone: int  # rows of the first batch made again one at a time


GPU = Plan("cuda", 512, 50, (16, 1), (torch.float16, torch.bfloat16), 2, ("compile",), 64, 4)
CPU_DRY_RUN = Plan("cpu", 64, 2, (2, 1), (torch.float32, torch.bfloat16), 1, ("compile",), 4, 2)
CLI_DTYPES = {dtype: name for name, dtype in DTYPES.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="the JSON to write")
    p.add_argument("--work", type=Path, default=fixtures.REPO / "bench" / "results" / "gpu-check-work",
                   help="scratch: the job's and the loop's images, the dry run's tiny model")
    p.add_argument("--cpu-dry-run", action="store_true", help="the same code on the CPU at tiny sizes")
    p.add_argument("--cache", type=Path, default=fixtures.DEFAULT_CACHE, help="where the SD v1.5 weights are kept")
    p.add_argument("--levers", nargs="*", choices=list(gpu.LEVERS), help="sdcore's levers to measure (default compile)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    plan = CPU_DRY_RUN if args.cpu_dry_run else GPU
    if args.levers is not None:
        plan = dataclasses.replace(plan, levers=tuple(args.levers))
    work = args.work.resolve()  # the job runs from the repository's root
    started = time.perf_counter()
    result = {"command": "python -m bench.gpu_check " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": machine(), "versions": versions(), "partial": True, "gpu": {}}
    out = args.out.with_suffix("")

    def save(figures: dict) -> None:
        write_json(out, {**result, "gpu": figures})

    folder = tiny_weights(work / "tiny-sd") if args.cpu_dry_run else fixtures.ensure_weights(args.cache, log=log)[0]
    result["weights_bytes"] = sum(f.stat().st_size for f in folder.rglob("*.safetensors"))
    result["gpu"] = check(plan, folder, work, save)
    result |= {"partial": False, "total_s": time.perf_counter() - started}
    write_json(out, result)
    log(f"wrote {args.out} in {result['total_s'] / 60:.1f} min")
    return result


def tiny_weights(folder: Path) -> Path:
    from tests.reference import (TINY_CLIP, TINY_UNET, TINY_VAE, reference_text_encoder, reference_unet, reference_vae,
                                 write_diffusers_folder)

    return write_diffusers_folder(folder, reference_unet(TINY_UNET), reference_vae(TINY_VAE),
                                  reference_text_encoder(TINY_CLIP))


def check(plan: Plan, folder: Path, work: Path, save) -> dict:
    figures = gpu.section(folder, log, device=plan.device, size=plan.size, steps=plan.steps, batches=plan.batches,
                          dtypes=plan.dtypes, levers=plan.levers, lever_batches=plan.batches[:1], reps=plan.reps,
                          save=save)
    if "skipped" in figures:
        return figures
    figures["job"] = attempt("job efficiency", lambda: jobsystem.compare(
        str(folder), "SD v1.5 (random weights)", plan.job_images, 1, size=plan.size, steps=plan.steps,
        shard_size=plan.job_images, reps=1, work=work / "job", log=log, batch_size=plan.batches[0],
        device=plan.device, dtype=CLI_DTYPES[plan.dtypes[0]]))
    save(figures)
    figures["batch_differences"] = []
    for dtype in plan.dtypes:
        name = str(dtype).removeprefix("torch.")
        figures["batch_differences"].append({"dtype": name, **attempt(
            f"{name} batch {plan.batches[0]} against rows alone", lambda: batch_differences(folder, plan, dtype))})
        save(figures)
    return figures


def attempt(what: str, measure) -> dict:
    """`measure()`'s figures, or its error: one part that fails must not cost the next its minutes."""
    try:
        return measure()
    except Exception as e:
        log(f"{what} failed: {gpu.error_text(e)}")
        return {"error": gpu.error_text(e)}


def batch_differences(folder: Path, plan: Plan, dtype: torch.dtype) -> dict:
    """The first `plan.rows_alone` rows of a batch, each made again alone with its seed: the largest
    difference of their uint8 pixels, and how many pixels (any channel) differ at all."""
    import sdcore

    pipe = sdcore.load_pipeline(folder, device=plan.device, dtype=dtype)
    batch = plan.batches[0]
    log(f"{str(dtype).removeprefix('torch.')}: batch {batch}, then {plan.rows_alone} of its rows alone")
    together = images(pipe, plan, range(batch))
    alone = [images(pipe, plan, [seed])[0] for seed in range(plan.rows_alone)]
    del pipe
    gpu.free(plan.device)
    diffs = [np.abs(a.astype(np.int16) - b.astype(np.int16)) for a, b in zip(together, alone)
             if a is not None and b is not None]  # random weights in half precision can give NaN rows
    return {"batch": batch, "rows": len(diffs), "non_finite_rows": plan.rows_alone - len(diffs),
            "max_abs_uint8": max((int(d.max()) for d in diffs), default=None),
            "differing_pixels": sum(int(d.any(axis=-1).sum()) for d in diffs),
            "pixels": sum(d.shape[0] * d.shape[1] for d in diffs)}


def images(pipe, plan: Plan, seeds) -> list:
    """uint8 images of `seeds`, None where a row came out non-finite."""
    from sdcore.errors import NonFiniteOutputError

    seeds = list(seeds)
    try:
        return pipe.generate([gpu.PROMPT] * len(seeds), seeds=seeds, steps=plan.steps, height=plan.size,
                             width=plan.size, scheduler="ddim", output="np")
    except NonFiniteOutputError as e:
        return e.images


if __name__ == "__main__":
    main()
