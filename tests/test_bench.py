"""`make bench`'s code on small sizes, so that the benchmark still runs when it is next needed: the
job-system section end to end (the job's images equal the plain loop's), the GPU section's code on
the CPU, the `--compile` figures, and the FLOP counts that turn times into rates."""
import argparse

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

import sdcore
from bench import flops, gpu, jobsystem, levers, run
from bench.timing import verdict
from sdcore import layers
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
@pytest.mark.parametrize("lever, shape", [("winograd_conv", (2, 8, 16, 16)), ("small_conv_matmul", (2, 8, 4, 4))])
def test_cpu_lever_off_runs_the_plain_convolution_and_comes_back(monkeypatch, lever, shape):
    # So that the small test kernel takes the matmul on small maps and Winograd on larger ones.
    monkeypatch.setattr(layers, "MATMUL_MIN_KERNEL", 0)
    monkeypatch.setattr(layers, "WINOGRAD_MIN_CHANNELS", 0)
    conv = layers.Conv3x3(8, 8)
    model, x = nn.Sequential(conv), torch.randn(shape)
    plain = F.conv2d(x, conv.weight, conv.bias, padding=1)
    on = conv(x)
    with levers.LEVERS[lever][2](model):
        assert torch.equal(conv(x), plain)
    assert torch.equal(conv(x), on) and not torch.equal(on, plain)


@torch.no_grad()
def test_cpu_lever_off_keeps_winograd_kernels_unpacked(monkeypatch):
    monkeypatch.setattr(layers, "WINOGRAD_MIN_CHANNELS", 0)
    conv = layers.Conv3x3(8, 8)
    x = torch.randn(2, 8, 16, 16)
    with levers.LEVERS["packed_winograd_kernels"][2](nn.Sequential(conv)):
        off = conv(x)
        assert list(conv._from_weight[2]) == [layers.winograd_transform_kernel]
    assert torch.equal(conv(x), off)
    assert list(conv._from_weight[2]) == [layers.winograd_transform_kernel, layers.packed_winograd_kernel]


@torch.no_grad()
def test_cpu_levers_measure_each_lever_off_alone_and_all_off():
    model = nn.Sequential(layers.Linear(8, 8), layers.Conv3x3(8, 8))
    x = torch.randn(2, 8, 16, 16)
    rows = levers.measure({"tiny": (model, lambda: model[1](x) + model[0](x.transpose(1, 3)).transpose(1, 3))},
                          reps=1, log=lambda _: None)
    assert [r["variant"] for r in rows] == ["all levers"] + [f"without {name}" for name in levers.LEVERS] + ["without any"]
    assert all(r["median_s"] > 0 and len(r["runs_s"]) == 1 for r in rows)
    v = torch.randn(5, 8)
    with levers.LEVERS["onednn_linear"][2](model):
        assert torch.equal(model[0](v), F.linear(v, model[0].weight, model[0].bias))


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
    (planned,) = result["plans"]
    assert (planned["rows"], planned["shards"]) == (1000, 5) and planned["peak_rss"] >= planned["rss_after_import"]
    text = "\n".join(jobsystem.render(result))
    assert "| builtin:tiny, 64², 1 steps | 6 | 1 |" in text and "| 1,000 | 5 |" in text
    assert f"| {tiny['loop_first_call_s']:.2f} / {tiny['job_first_call_s']:.2f} |" in text
    assert f"spent {result['outside_batches_ms_per_image']:.1f} ms per image outside its batches" in text
    # Each target judged on the figures above it.
    assert (f"SD rows: 1 actor {verdict(sd['efficiency'] >= 0.95)} ({100 * sd['efficiency']:.0f} %). In the calls after "
            f"each process's first (actors × the loop's later call ÷ the job's): 1 actor "
            f"{100 * sd['loop_later_call_s'] / sd['job_later_call_s']:.0f} %; in a longer job than these 4 images") in text
    assert f"Target (≤ 5 ms): {verdict(result['framework_ms_per_image'] <= 5)}." in text
    assert "10,000,000 rows): not judged, the largest manifest planned had 1,000 rows." in text
    assert len(logged) == 3


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
    text = "\n".join(gpu.render(result))
    assert "| float32 | 1 |" in text and "| cuda_graphs | float32 | 2 |" in text


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
    assert "| compile | float32 | 1 | failed: RuntimeError: Cannot find a working triton installation |" in "\n".join(
        gpu.render(result))


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
    text = "\n".join(run.render_compiled(result, {"steps": 2}))
    assert "| whole image (2 steps + decode) | 2 |" in text and "Target with `--compile`" in text


def test_gpu_figures_from_another_machine_join_the_report(tmp_path):
    import json

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
    text = (tmp_path / "BENCH.md").read_text()
    assert "Measured apart: `python -m bench.run --sections gpu`" in text and "torch 2.11.0" in text
    assert "the run stopped before its end" in text and "| bfloat16 | 16 | 8.00 | 5.00 | **1.60** | 65 % | 65 % |" in text
    assert ("Target (H100-class, 512², 50 steps, batch 16: ≥ 6 images/s and ≥ 1.5 × diffusers eager): bfloat16 met "
            "(eager: 8.00 images/s, 1.60 × diffusers eager, 65 % of peak).") in text


def test_gpu_target_takes_the_fastest_lever_and_needs_both_figures():
    def row(dtype, batch, per_s, speedup):
        return {"dtype": dtype, "batch": batch, "sdcore": {"images_per_s": per_s, "peak_fraction": None},
                "speedup_vs_diffusers": speedup}

    figures = {"device": "NVIDIA H100 80GB HBM3", "size": 512, "steps": 50,
               "rows": [row("bfloat16", 16, 5.0, 1.2), row("bfloat16", 1, 0.9, 1.9), row("float16", 16, 6.5, 1.4),
                        row("float32", 16, 5.5, 1.6)],
               "levers": [{"lever": "compile", "dtype": "bfloat16", "batch": 16, "images_per_s": 7.0,
                           "speedup_vs_diffusers": 1.7, "peak_fraction": 0.5},
                          {"lever": "channels_last", "dtype": "bfloat16", "batch": 16, "images_per_s": 5.5,
                           "speedup_vs_diffusers": 1.3, "peak_fraction": 0.4},
                          {"lever": "cuda_graphs", "dtype": "bfloat16", "batch": 16, "error": "RuntimeError: no"}]}
    assert gpu.target_line(figures).endswith(
        "bfloat16 met (compile: 7.00 images/s, 1.70 × diffusers eager, 50 % of peak), "
        "float16 NOT met (eager: 6.50 images/s, 1.40 × diffusers eager, peak unknown), "
        "float32 NOT met (eager: 5.50 images/s, 1.60 × diffusers eager, peak unknown).")
    assert gpu.target_line({**figures, "device": "NVIDIA L4"}).endswith(": not judged on NVIDIA L4.")
    figures["rows"] = figures["rows"][1:2]  # a run cut short before the target batch
    assert gpu.target_line(figures).endswith(": batch 16 not measured.")


def test_job_targets_judge_each_figure_at_its_threshold():
    def sd_row(actors, efficiency, loop_later, job_later):
        return {"actors": actors, "efficiency": efficiency, "loop_later_call_s": loop_later, "job_later_call_s": job_later}

    line = jobsystem.efficiency_target([sd_row(1, 0.95, 9.0, 9.0), sd_row(2, 0.949, 5.0, 11.0)], 8)
    assert line == ("Target (job ≥ 95 % of the loop's steady images/s), SD rows: 1 actor met (95 %), 2 actors NOT met (95 %). "
                    "In the calls after each process's first (actors × the loop's later call ÷ the job's): 1 actor 100 %, "
                    "2 actors 91 %; in a longer job than these 8 images per actor, the efficiency comes closer to those.")
    # One call per process: no later calls to compare.
    assert jobsystem.efficiency_target([sd_row(1, 0.9, float("nan"), float("nan"))], 1).endswith("1 actor NOT met (90 %).")
    plans = [{"rows": 100_000, "peak_rss": 400 * 2**20}, {"rows": 10_000_000, "peak_rss": 10**9}]
    assert jobsystem.driver_target(plans).endswith(": NOT met (954 MiB, against 400 MiB at 100,000 rows).")
    plans[1]["peak_rss"] = 10**9 - 1
    assert ": met (954 MiB" in jobsystem.driver_target(plans)


@pytest.mark.parametrize("single_load_s, single_peak_gib, judged", [
    (0.4, 4.6, "single .safetensors met (0.40 s, 1.15 ×)"),
    (0.6, 4.6, "single .safetensors NOT met (0.60 s, 1.15 ×)"),  # slower than diffusers' from_pretrained
    (0.4, 5.0, "single .safetensors NOT met (0.40 s, 1.25 ×)"),  # over 1.2 × the weights, its kernels included
])
def test_cold_start_target_against_from_pretrained_and_the_weights(single_load_s, single_peak_gib, judged):
    def row(layout, library, load_s, peak_gib):
        return {"layout": layout, "library": library, "load_s": load_s, "peak_rss_after_first_use": peak_gib * 2**30}

    rows = [row(run.FOLDER, "sdcore", 0.3, 4.4), row(run.FOLDER, "diffusers", 0.5, 4.3),
            row(run.SINGLE_FILE, "sdcore", single_load_s, single_peak_gib), row(run.SINGLE_FILE, "diffusers", 17.0, 8.5)]
    line = run._cold_start_target({"cold_start": rows, "weights_bytes": 4 * 2**30})
    assert line.startswith("Target (load no slower than diffusers' `from_pretrained` on the folder, 0.50 s;")
    assert line.endswith(f": diffusers folder met (0.30 s, 1.10 ×), {judged}.")


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
    steps = [row["sdcore_s"] for row in result["rows"] if row["figure"].startswith("one UNet step")]
    [together] = run._rows_together(result["rows"])
    assert f"(CFG batch 4), the call `generate` makes on the CPU, took {steps[1]:.2f} s against 2 × {steps[0]:.2f} s" in together


def test_levers_render_names_only_what_the_run_measured():
    base = {"command": "make bench", "allocator": "glibc", "weights_bytes": 4 * 2**30,
            "machine": {"cpu": "AMD EPYC (Zen 4)", "cores": 2, "ram_gib": 23.4, "torch_threads": 2, "python": "3.11.7",
                        "load_average_at_start": [0.1], "date": "2026-12-03 18:00 UTC"},
            "versions": {"torch": "2.13.0", "diffusers": "0.42.1", "transformers": "5.24.0", "sdbatch": "0.1.0",
                         "sdbatch_commit": "abc1234"}}
    rows = [{"workload": "UNet step", "variant": v, "median_s": 2.0, "runs_s": [2.0], "slowdown_vs_all": 1.0}
            for v in ("all levers", "without onednn_linear", "without a_lever_since_removed", "without any")]
    text = run.render({**base, "levers": rows})
    assert f"- `onednn_linear`: {levers.LEVERS['onednn_linear'][0]}" in text
    assert "- `a_lever_since_removed`: since dropped (bench/levers.md)" in text
    assert "- `winograd_conv`:" not in text
