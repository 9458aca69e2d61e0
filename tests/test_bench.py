"""`make bench`'s code on small sizes, so that the benchmark still runs when it is next needed: the
job-system section end to end (the job's images equal the plain loop's), the GPU section's code on
the CPU, the `--compile` figures, and the FLOP counts that turn times into rates."""
import argparse
import json

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn as nn
from torch._dynamo.utils import counters

import sdcore
from bench import flops, gpu, jobsystem, levers, run
from sdcore import cpu
from sdcore.cpu import CPUKernels
from tests.reference import TINY_CLIP, TINY_UNET, TINY_VAE, reference_text_encoder, reference_unet, reference_vae, write_diffusers_folder


def test_flop_counts_are_the_published_figures():
    # The published estimates for SD v1.5 at 512²: UNet about 0.68-0.80 TFLOP per sample and step (the
    # count here has attention too), VAE decode about 2.5 TFLOP, a 50-step CFG image 70-83 TFLOP.
    assert 0.68e12 <= flops.unet_row(512) <= 0.82e12
    assert 2.4e12 <= flops.vae_decode(512) <= 2.6e12
    assert 70e12 <= flops.image(512, 50) <= 83e12
    # Convolutions scale with the pixels, attention faster: a little under a quarter at half the side.
    assert 3.9 < flops.vae_decode(512) / flops.vae_decode(256) < 4.2
    assert flops.cpu_matmul_peak(n=256, reps=1) > 1e8


@torch.no_grad()
def test_cpu_levers_switch_each_kernel_off_and_come_back():
    kernels = CPUKernels(winograd_min_channels=0)
    model = cpu.accelerate(nn.Sequential(nn.Linear(8, 8), nn.Conv2d(8, 8, 3, padding=1)), kernels)
    x = torch.randn(2, 8, 16, 16)

    def call():
        return model[1](x) + model[0](x.transpose(1, 3)).transpose(1, 3)

    with_all = call()
    rows = levers.measure({"tiny": (model, call)}, reps=1, log=lambda _: None, kernels=kernels)
    assert [r["variant"] for r in rows] == ["all levers"] + [f"without {name}" for name in levers.LEVERS] + ["without any"]
    assert all(r["median_s"] > 0 and len(r["runs_s"]) == 1 for r in rows)
    # Back to every kernel, with the Winograd kernels made once and kept.
    assert isinstance(model[0], cpu.OneDNNLinear) and model[1].kernels == kernels
    assert torch.equal(call(), with_all)
    assert list(model[1]._from_weight[2]) == [cpu.packed_winograd_kernel, cpu.winograd_transform_kernel]


def test_read_once_reads_every_file_of_a_folder_or_one_file(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "w.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "model_index.json").write_bytes(b"{}")
    assert jobsystem.read_once(tmp_path, chunk=64) == 1002
    assert jobsystem.read_once(tmp_path / "unet" / "w.safetensors") == 1000


def test_job_section_makes_the_loops_images(tmp_path):
    logged = []
    result = jobsystem.section("builtin:tiny", tmp_path, logged.append, sd_rows_per_actor=4, sd_reps=1, tiny_rows=6, tiny_reps=1,
                               actors=(1,), plan_rows=(1000,))
    (sd,), tiny = result["efficiency"], result["tiny"]
    # One actor and one torch thread on each side: the job's images are the loop's, bit for bit.
    assert sd["max_pixel_difference"] == 0 and tiny["max_pixel_difference"] == 0
    assert (sd["images"], sd["actors"], sd["shard_size"]) == (4, 1, 2)
    # The loop makes the job's calls: --batch-size 4 within shards of 2 and of 100 rows.
    assert (sd["rows_per_call"], tiny["rows_per_call"]) == (2, 4)
    assert all(loop["batch_size"] == figure["rows_per_call"] for figure in (sd, tiny) for loop in figure["loop_runs"])
    for figure in (sd, tiny):
        assert figure["efficiency"] > 0 and figure["job_startup_s"] > 0
        job, loop = figure["job_runs"][0], figure["loop_runs"][0]
        assert figure["job_end_to_end_s"] > job["steady_s"] > job["busy_s"] > 0
        # Two calls on each side (SD: a shard of 2 rows each; tiny: 4 rows and 2 of one shard), the first
        # apart; the job's, read back from its metadata, make up its actor's time inside batches.
        assert len(loop["call_s"]) == 2 and len(job["first_call_s"]) == 1 and len(job["later_call_s"]) == 1
        assert 0 < sum(job["first_call_s"] + job["later_call_s"]) <= job["busy_s"]
        assert 0 < sum(loop["call_s"]) <= loop["images_s"]
        assert figure["job_first_call_s"] == job["first_call_s"][0]
    # Scoring: the SD job's 4 rows again, scored; its metadata has the scores.
    scoring = result["scoring"]
    (plain,), (scored,) = sd["job_runs"], scoring["scored_runs"]
    assert plain["scoring_s"] == 0 and 0 < scored["scoring_s"] < scored["busy_s"]
    assert scoring["scoring_s_per_image"] == scored["scoring_s"] / 4 and 0 < scoring["scoring_share"] < 1
    assert scoring["busy_difference_s_per_image"] == (scored["busy_s"] - plain["busy_s"]) / 4
    meta = pq.read_table(tmp_path / "scored-out" / "metadata").to_pylist()
    assert len(meta) == 4 and all(m["clip_score"] >= 0 and m["aesthetic_score"] is not None and m["nsfw"] is not None
                                  for m in meta)
    text = "\n".join(jobsystem.render(result))
    assert f"**{100 * scoring['scoring_share']:.1f} %**" in text and f"**{scoring['scoring_s_per_image']:.3f} s**" in text
    (planned,) = result["plans"]
    assert (planned["rows"], planned["shards"]) == (1000, 5) and planned["peak_rss"] >= planned["rss_after_import"]
    assert len(logged) == 4


def test_gpu_section_code_runs_on_the_cpu(tmp_path):
    folder = write_diffusers_folder(tmp_path / "tiny-sd", reference_unet(TINY_UNET), reference_vae(TINY_VAE),
                                    reference_text_encoder(TINY_CLIP))
    saved = []
    result = gpu.section(folder, lambda _: None, device="cpu", size=64, steps=2, batches=(2, 1), lever_batches=(2,),
                         dtypes=(torch.float32, torch.bfloat16), reps=1, save=lambda figures: saved.append(
                             ([(r["dtype"], r["batch"]) for r in figures["rows"]], [r["lever"] for r in figures["levers"]])))
    assert [(row["dtype"], row["batch"]) for row in result["rows"]] == [
        ("float32", 2), ("float32", 1), ("bfloat16", 2), ("bfloat16", 1)]
    for row in result["rows"]:
        for lib in ("sdcore", "diffusers"):
            assert row[lib]["images_per_s"] == row["batch"] / row[lib]["s"] > 0
            assert row[lib]["peak_fraction"] is None  # no known peak for a CPU
    # Every lever once, in the first dtype, at the lever batch; each figure saved as soon as it exists.
    assert [(r["lever"], r["dtype"], r["batch"]) for r in result["levers"]] == [
        (lever, "float32", 2) for lever in gpu.LEVERS]
    for row in result["levers"]:
        assert "error" not in row, row
        assert row["images_per_s"] > 0 and row["first_call_s"] > 0 and row["vs_eager"] > 0
    f32, bf16, levers = [("float32", 2), ("float32", 1)], [("bfloat16", 2), ("bfloat16", 1)], list(gpu.LEVERS)
    assert saved == [(f32[:1], []), (f32, [])] + [(f32, levers[:n]) for n in range(1, len(levers) + 1)] + [
        (f32 + bf16[:1], levers), (f32 + bf16, levers)]


def test_gpu_lever_that_fails_is_recorded_and_the_rest_go_on(tmp_path, monkeypatch):
    folder = write_diffusers_folder(tmp_path / "tiny-sd", reference_unet(TINY_UNET), reference_vae(TINY_VAE),
                                    reference_text_encoder(TINY_CLIP))
    real = gpu.apply_lever

    def broken_compile(pipe, lever):
        if lever == "compile":
            raise RuntimeError("Cannot find a working triton installation\nmore detail")
        real(pipe, lever)

    monkeypatch.setattr(gpu, "apply_lever", broken_compile)
    result = gpu.section(folder, lambda _: None, device="cpu", size=64, steps=2, batches=(1,), lever_batches=(1,),
                         dtypes=(torch.float32,), levers=("compile", "channels_last"), reps=1)
    failed, worked = result["levers"]
    assert failed == {"lever": "compile", "dtype": "float32", "batch": 1,
                      "error": "RuntimeError: Cannot find a working triton installation"}
    assert worked["lever"] == "channels_last" and worked["images_per_s"] > 0


def test_compiled_section_times_the_compiled_pipeline(tmp_path):
    folder = write_diffusers_folder(tmp_path / "tiny-sd", reference_unet(TINY_UNET), reference_vae(TINY_VAE),
                                    reference_text_encoder(TINY_CLIP))
    pipe = sdcore.load_pipeline(folder)
    args = argparse.Namespace(size=64, steps=2, batches=[1, 2], compile_batches=[1, 2], compile_reps=1, reps=1)
    cpu = {"rows": [{"figure": "whole image (2 steps + decode)", "batch": b, "sdcore_s": 1.0, "diffusers_s": 2.0}
                    for b in (1, 2)]}
    pipe.compile()  # compiles its check's one-graph probe now; compiled_section's own call then returns at once
    graphs_before = counters["stats"]["unique_graphs"]
    result = run.compiled_section(pipe, cpu, args)
    assert counters["stats"]["unique_graphs"] - graphs_before == 1  # the step figure and the images share one compile
    assert pipe.compiled and result["compile_s"] > 0 and result["unet_largest_difference"] < 1e-4
    assert [w["batch"] for w in result["whole_images"]] == [1, 2]
    for w in result["whole_images"]:
        assert w["compiled_s"] > 0 and w["ratio"] == w["compiled_s"] / 2.0


def test_gpu_figures_from_another_machine_join_the_report(tmp_path):
    base = {"command": "make bench (python -m bench.run)", "allocator": "glibc", "weights_bytes": 4 * 2**30,
            "settings": {}, "total_s": 600.0,
            "machine": {"cpu": "AMD EPYC (Zen 4)", "cores": 2, "ram_gib": 23.4, "torch_threads": 2, "python": "3.11.7",
                        "load_average_at_start": [0.1], "date": "2026-12-02 18:00 UTC"},
            "versions": {"torch": "2.13.0", "diffusers": "0.42.1", "transformers": "5.24.0", "sdbatch": "0.1.0",
                         "sdbatch_commit": "abc1234"}}
    (tmp_path / "BENCH.json").write_text(json.dumps(base))
    eager = {"s": 2.0, "runs_s": [2.0], "images_per_s": 8.0, "peak_fraction": 0.65}
    figures = {"device": "NVIDIA H200", "peak_flops": 989e12, "flops_per_image": 80e12, "size": 512, "steps": 50,
               "rows": [{"dtype": "bfloat16", "batch": 16, "sdcore": eager, "diffusers": {**eager, "images_per_s": 5.0},
                         "non_finite_rows": {}, "speedup_vs_diffusers": 1.6}], "levers": []}
    gpu_run = {**base, "command": "python -m bench.run --sections gpu", "partial": True, "gpu": figures,
               "machine": {**base["machine"], "cores": 16, "gpu": "NVIDIA H200"}, "versions": {**base["versions"], "torch": "2.11.0"}}
    (tmp_path / "gpu.json").write_text(json.dumps(gpu_run))
    run.main(["--render-only", "--gpu-from", str(tmp_path / "gpu.json"), "--out", str(tmp_path / "BENCH")])
    merged = json.loads((tmp_path / "BENCH.json").read_text())
    assert merged["machine"]["cores"] == 2 and merged["gpu"]["machine"]["cores"] == 16
    assert merged["gpu"]["rows"] == figures["rows"] and merged["gpu"]["partial"] is True


def test_gpu_check_dry_run_measures_and_renders_every_figure(tmp_path):
    from bench import gpu_check

    gpu_check.main(["--cpu-dry-run", "--levers", "channels_last", "--out", str(tmp_path / "gpu.json"), "--work",
                    str(tmp_path / "work")])
    run.main(["--render-only", "--gpu-from", str(tmp_path / "gpu.json"), "--out", str(tmp_path / "BENCH")])
    g = json.loads((tmp_path / "BENCH.json").read_text())["gpu"]
    assert g["partial"] is False and g["machine"]["cores"] >= 1
    assert [(r["dtype"], r["batch"]) for r in g["rows"]] == [
        ("float32", 2), ("float32", 1), ("bfloat16", 2), ("bfloat16", 1)]
    (lever,) = g["levers"]
    assert lever["lever"] == "channels_last" and lever["images_per_s"] > 0
    job = g["job"]
    # One actor and one torch thread on each side, 2 rows a call: the job's images are the loop's.
    assert (job["images"], job["actors"], job["rows_per_call"], job["device"], job["dtype"]) == (4, 1, 2, "cpu", "fp32")
    assert job["efficiency"] > 0 and job["max_pixel_difference"] == 0
    differences = {row["dtype"]: row for row in g["batch_differences"]}
    assert set(differences) == {"float32", "bfloat16"}
    for row in differences.values():
        assert (row["batch"], row["rows"], row["pixels"]) == (2, 2, 2 * 64 * 64) and row["max_abs_uint8"] is not None
    # On the CPU a row's image does not depend on the rows beside it.
    assert differences["float32"]["max_abs_uint8"] == 0 and differences["float32"]["differing_pixels"] == 0

    section = (tmp_path / "BENCH.md").read_text().split("## 4. GPU — 64×64, 2 steps")[1]
    for figure in ("| float32 | 2 |", "| bfloat16 | 1 |", "| channels_last | float32 | 2 |",
                   f"**{100 * job['efficiency']:.0f} %**", "Target (job ≥ 95 % of the loop): ",
                   "| float32 | 2 | 0 | 0.00 % (0 of 8,192) |", "| bfloat16 | 2 |"):
        assert figure in section, figure


def test_gpu_wheels_are_the_tests_pins():
    import re
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    test_extra = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    makefile = (root / "Makefile").read_text()
    for package in ("diffusers", "transformers"):
        pinned = re.search(rf"^{package.upper()}_VERSION := (\S+)$", makefile, re.M).group(1)
        assert f"{package}=={pinned}" in test_extra, package


def test_cpu_section_times_both_libraries_and_checks_they_agree(tmp_path):
    folder = write_diffusers_folder(tmp_path / "tiny-sd", reference_unet(TINY_UNET), reference_vae(TINY_VAE),
                                    reference_text_encoder(TINY_CLIP))
    ours, ref = run.load_both(folder)
    args = argparse.Namespace(size=64, steps=2, batches=[1, 2], image_reps=[1, 1], reps=2, slow_reps=1)
    calls, generate = [], ours.generate
    ours.generate = lambda prompts, **kw: calls.append((len(prompts), kw["steps"])) or generate(prompts, **kw)
    result = run.cpu_section(ours, ref, args)
    # Each batch's timed images come after an untimed one-step image, which sets up their allocations.
    assert calls == [(1, 1), (1, 2), (2, 1), (2, 2)]
    figures = [(row["figure"], row["batch"]) for row in result["rows"]]
    assert figures == [(name, b) for b in (1, 2) for name in ("text encoding (prompt + negative)", "one UNet step (CFG batch "
                                                                f"{2 * b})", "VAE decode")] + [
        ("whole image (2 steps + decode)", 1), ("whole image (2 steps + decode)", 2)]
    for row in result["rows"]:
        assert row["sdcore_s"] > 0 and row["diffusers_s"] > 0 and row["ratio"] == row["sdcore_s"] / row["diffusers_s"]
    # The parity figures come from the timed calls' outputs: the same weights give the same numbers.
    parity = result["parity"]
    assert sorted(parity) == ["image_b1_max_abs_uint8", "image_b2_max_abs_uint8", "unet_b1", "unet_b2", "vae_b1", "vae_b2"]
    assert max(parity[k] for k in ("unet_b1", "unet_b2")) < 1e-4 and max(parity["vae_b1"], parity["vae_b2"]) < 1e-3
    assert max(v for k, v in parity.items() if k.startswith("image")) <= 2


def test_report_renders_from_a_small_fake_result_set():
    machine = {"cpu": "AMD EPYC (Zen 4)", "cores": 2, "ram_gib": 23.4, "torch_threads": 2, "python": "3.11.7",
               "load_average_at_start": [0.1], "date": "2026-12-03 18:00 UTC"}
    versions = {"torch": "2.13.0", "diffusers": "0.42.1", "transformers": "5.24.0", "sdbatch": "0.1.0",
                "sdbatch_commit": "abc1234"}

    def row(figure, batch):
        return {"figure": figure, "batch": batch, "sdcore_s": 1.0, "diffusers_s": 2.0, "ratio": 0.5, "ratio_fastest": 0.5,
                "sdcore_flops_per_s": 1e11, "diffusers_flops_per_s": 5e10, "reps": 2, "min_cpu_share": 0.9}

    def cold(layout, library):
        return {"layout": layout, "library": library, "load_s": 0.5, "import_s": 1.0, "peak_rss_ready": 2**30,
                "peak_rss_after_first_use": 4 * 2**30, "kernels_made_bytes": 0, "runs": [{}]}

    result = {
        "command": "make bench", "allocator": "glibc", "weights_bytes": 4 * 2**30, "machine": machine,
        "versions": versions, "total_s": 60.0, "settings": {"size": 256, "steps": 20},
        "cpu": {"rows": [row("one UNet step (CFG batch 2)", 1), row("whole image (20 steps + decode)", 1)],
                "parity": {"unet_b1": 1e-6}, "threads": 2, "matmul_peak_flops": 2e11},
        "cpu_kernels": {"size": 256, "steps": 5, "on_s": 10.0, "off_s": 12.0, "speedup": 1.2, "min_cpu_share": 0.9,
                        "threads": 2, "runs_s": {"kernels on": [10.0], "kernels off": [12.0]}},
        "cold_start": [cold(layout, library) for layout in (run.FOLDER, run.SINGLE_FILE) for library in ("sdcore", "diffusers")],
        "levers": [{"workload": "UNet step", "variant": v, "median_s": 2.0, "runs_s": [2.0], "slowdown_vs_all": 1.0}
                   for v in ("all levers", "without onednn_linear", "without any")],
    }
    text = run.render(result)
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    for section in ("This run", "1. Model, same weights", "CPU kernels on vs off", "2. Cold start", "Levers"):
        assert any(section in h for h in headings), section
    assert "| kernels on | 10.00 |" in text


def test_kernels_section_times_the_pipeline_with_and_without_its_cpu_kernels():
    pipe = sdcore.load_pipeline("builtin:tiny")
    twin = run.plain_twin(pipe)
    assert all(p is q or p.data_ptr() == q.data_ptr() for p, q in zip(pipe.unet.parameters(), twin.unet.parameters()))
    assert not any(isinstance(m, (cpu.OneDNNLinear, cpu.FastConv3x3)) for m in twin.unet.modules())
    result = run.kernels_section(pipe, argparse.Namespace(size=64, steps=2, kernel_steps=2, kernel_reps=1))
    assert result["on_s"] > 0 and result["off_s"] > 0 and result["speedup"] == result["off_s"] / result["on_s"]
    assert [len(ts) for ts in result["runs_s"].values()] == [1, 1]
