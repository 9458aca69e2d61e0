"""--score and --keep in the job, on builtin:tiny with tiny random scorers: the scores in the metadata
are those of the written images; rows failing the rule are made again with deterministic seeds; the
kept images do not depend on the actors, batches or a resume; bad input stops before any shard."""
import json

import numpy as np
import pytest
import ray
import torch

from jobs import progress, scorers, sink
from jobs.scorers import KeepRule, KeepRuleError, ScoreSpec, attempt_seed
from sdcore import scorer_weights, scoring
from tests.jobdata import (MODEL, TIMING, check_images, pixels, read_dataset, start_local_ray, tar_members,
                           write_manifest)
from tests.scorerdata import (TINY_PROJECTION, reference_safety_checker, save_aesthetic, save_safety_checker,
                              tiny_clip_folder)
from tests.test_actor import run_driver
from tests.test_run import assert_user_error, invoke, no_ray  # noqa: F401 (a fixture)

ROWS = 8
RULE_COLUMNS = ("clip_score", "nsfw_score", "nsfw", "aesthetic_score", *scorers.PARAM_COLUMNS)


@pytest.fixture(scope="module")
def local_ray():
    start_local_ray()
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def scorer_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("scorers")
    tiny_clip_folder(root / "clip")
    save_safety_checker(reference_safety_checker(), root / "sd")
    save_aesthetic(root / "aesthetic.pth", TINY_PROJECTION)
    save_aesthetic(root / "aesthetic-l14.pth", 768)  # for ViT-L/14's embeddings: does not fit the tiny CLIP
    return root


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    # The last row's steps fail the rule's second clause on every attempt: it is always rejected.
    return write_manifest(tmp_path_factory.mktemp("m") / "m.parquet", id=[f"r{i}" for i in range(ROWS)],
                          prompt=[f"a photo of thing {i}" for i in range(ROWS)], steps=[2] * (ROWS - 1) + [3],
                          label=[f"L{i}" for i in range(ROWS)])


def spec(files, **keep) -> ScoreSpec:
    return ScoreSpec(("clip", "nsfw", "aesthetic"), clip_model=str(files / "clip"), safety_checker=str(files / "sd"),
                     aesthetic_model=str(files / "aesthetic.pth"), **keep)


def run(manifest, out, files, **options):
    scoring = options.pop("scoring", None) or spec(files)
    return run_driver(manifest, out, scoring=scoring, **options)


@pytest.fixture(scope="module")
def scored(tmp_path_factory, local_ray, manifest, scorer_files):
    """A job that only scores; the keep rule's threshold is the median of its aesthetic scores (the tiny
    CLIP's clip scores are mostly 0: random embeddings are as often opposed as aligned)."""
    out = tmp_path_factory.mktemp("scored") / "out"
    run(manifest, out, scorer_files, actors=1, batch_size=4, shard_size=4)
    meta, failures = read_dataset(out)
    assert len(meta) == ROWS and not failures
    threshold = float(np.median([m["aesthetic_score"] for m in meta.values()]))
    return out, meta, f"aesthetic_score >= {threshold!r} and steps < 3"


def test_a_job_without_scores_has_the_identity_of_one_written_before_them():
    assert ScoreSpec().identity() | {"scorer_fingerprints": {}} == sink.NO_SCORING


def test_attempt_seeds_depend_on_the_seed_and_attempt_only():
    assert attempt_seed(42, 1) == 42
    seeds = {attempt_seed(s, a) for s in (0, 42, 2**63 - 1) for a in (2, 3, 4)}
    assert len(seeds) == 9 and all(0 <= s < 2**63 for s in seeds)
    assert attempt_seed(42, 2) == attempt_seed(42, 2) != attempt_seed(43, 2)


def test_keep_rules_are_parsed_not_run():
    rule = KeepRule("clip_score >= 26 and not nsfw and (aesthetic_score > 5 or prompt == 'x')", RULE_COLUMNS)
    assert rule.clauses == ["clip_score >= 26", "not nsfw", "aesthetic_score > 5 or prompt == 'x'"]
    row = {"clip_score": 30.0, "nsfw": False, "aesthetic_score": 4.0, "prompt": "x"}
    assert rule.clause_results(row) == [True, True, True]
    assert rule.clause_results({**row, "nsfw": True, "prompt": "y"}) == [True, False, False]
    assert KeepRule("-1 < nsfw_score <= 0.5", RULE_COLUMNS).clause_results({"nsfw_score": 0.1}) == [True]
    assert KeepRule("clip_score > 1", RULE_COLUMNS).clause_results({"clip_score": None}) == [False]
    for text, message in (("__import__('os').system('x')", "not allowed"), ("clip_score.real > 1", "not allowed"),
                          ("clip_scor > 1", "unknown column 'clip_scor'"), ("clip_score >", "not an expression"),
                          ("clip_score > [1]", "not allowed"), ("clip_score > None", "not a number"),
                          ("-clip_score < 1", "numbers only"), ("clip_score + 1 > 2", "not allowed")):
        with pytest.raises(KeepRuleError, match=message):
            KeepRule(text, RULE_COLUMNS)


@torch.no_grad()
def test_scores_in_the_metadata_are_those_of_the_written_images(scored, scorer_files):
    out, meta, _ = scored
    images = check_images(out, meta)
    clip, tokenizer = scorer_weights.load_clip(scorer_files / "clip")
    checker = scorer_weights.load_safety_checker(scorer_files / "sd" / "safety_checker")
    predictor = scorer_weights.load_aesthetic_predictor(scorer_files / "aesthetic.pth")
    ids = sorted(meta)
    decoded = scoring.preprocess([pixels(images[i]) for i in ids])  # PNG: the pixels that were scored
    embeds = clip(decoded)
    clip_scores = scoring.clip_score(embeds, clip.embed_text(tokenizer([meta[i]["prompt"] for i in ids])))
    nsfw_scores, nsfw = checker(decoded)
    aesthetic = predictor(embeds)
    for n, i in enumerate(ids):
        row = meta[i]
        assert row["clip_score"] == pytest.approx(clip_scores[n].item(), abs=1e-4)
        assert row["nsfw_score"] == pytest.approx(nsfw_scores[n].item(), abs=1e-5) and row["nsfw"] == nsfw[n].item()
        assert row["aesthetic_score"] == pytest.approx(aesthetic[n].item(), abs=1e-5)
        assert (row["attempt"], row["kept"], row["row_seed"]) == (1, True, row["seed"])
    job = json.loads((out / "_sdbatch" / "job.json").read_text())
    assert set(job["identity"]["scorer_fingerprints"]) == {"clip", "nsfw", "aesthetic"}
    assert job["identity"]["scores"] == ["clip", "nsfw", "aesthetic"] and job["identity"]["keep"] == ""


def _kept_images(out):
    meta, failures = read_dataset(out)
    assert not failures
    return meta, check_images(out, {i: m for i, m in meta.items() if m["image_path"] is not None})


def test_keep_rule_retries_and_is_the_same_for_any_layout_and_resume(tmp_path, scored, manifest, scorer_files):
    _, first, rule = scored
    keep = spec(scorer_files, keep=rule, max_attempts=3)
    a, _ = run(manifest, tmp_path / "a", scorer_files, scoring=keep, actors=1, batch_size=1, shard_size=3)
    b, _ = run(manifest, tmp_path / "b", scorer_files, scoring=keep, actors=2, batch_size=4, shard_size=8)
    meta_a, images_a = _kept_images(tmp_path / "a")
    meta_b, images_b = _kept_images(tmp_path / "b")
    assert images_a == images_b and sorted(meta_a) == sorted(meta_b) == sorted(first)
    for image_id, row in meta_a.items():
        differs = {k for k in row if row[k] != meta_b[image_id][k]}
        assert differs <= {*TIMING, "image_path"}, (image_id, differs)
        # attempt 1 is the manifest's seed; later ones derive from it
        assert row["row_seed"] == first[image_id]["seed"]
        assert row["seed"] == attempt_seed(row["row_seed"], row["attempt"])
        passed = row["aesthetic_score"] >= float(rule.split()[2]) and row["steps"] < 3
        assert row["kept"] == passed and (passed or row["attempt"] == 3)
        assert row["keep_clauses_passed"][1] == (0 if row["steps"] == 3 else row["attempt"])
        if row["attempt"] == 1:
            assert images_a[image_id] == check_images(scored[0], {image_id: first[image_id]})[image_id]
    attempts = [row["attempt"] for row in meta_a.values()]
    assert max(attempts[:-1]) > 1 and any(r["kept"] and r["attempt"] > 1 for r in meta_a.values())
    assert not meta_a["r7"]["kept"] and meta_a["r7"]["attempt"] == 3
    assert a.keep == b.keep and a.keep["attempts"] == sum(attempts) and a.keep["rows"] == ROWS
    summary = progress.format_summary(a)
    assert f"{a.keep['kept']} of {ROWS} rows kept" in summary and "of it scoring" in summary
    assert a.keep["kept"] == sum(r["kept"] for r in meta_a.values()) and a.keep["dropped"] == 0
    assert [c["passed"] for c in a.keep["clauses"]] == [sum(r["keep_clauses_passed"][i] for r in meta_a.values())
                                                       for i in range(2)]

    # A resume makes the lost shard's images again, byte for byte; a different rule is another job.
    (tmp_path / "a" / "metadata" / "shard-000001.parquet").unlink()
    resumed, _ = run(manifest, tmp_path / "a", scorer_files, scoring=keep, actors=1, batch_size=2, shard_size=3)
    assert resumed.shards_run == 1
    meta_r, images_r = _kept_images(tmp_path / "a")
    assert images_r == images_a and {i: {k: v for k, v in r.items() if k not in TIMING} for i, r in meta_r.items()} \
        == {i: {k: v for k, v in r.items() if k not in TIMING} for i, r in meta_a.items()}
    status = invoke("status", tmp_path / "a")
    assert status.returncode == 0 and f"attempts ({sum(attempts) / ROWS:.2f} per row)" in status.stdout
    steps_passed = sum(r["keep_clauses_passed"][1] for r in meta_a.values())
    assert f"passed {steps_passed} of {sum(attempts)} attempts" in status.stdout
    assert json.loads(invoke("status", tmp_path / "a", "--json").stdout)["keep"] == a.keep
    with pytest.raises(Exception, match="keep: "):
        run(manifest, tmp_path / "a", scorer_files, scoring=spec(scorer_files, keep="steps < 3", max_attempts=3),
            actors=1, batch_size=1, shard_size=3)

    # --drop-rejected: the same kept images; a rejected row keeps its metadata, without an image
    dropped, _ = run(manifest, tmp_path / "c", scorer_files, actors=1, batch_size=4, shard_size=3,
                     scoring=spec(scorer_files, keep=rule, max_attempts=3, drop_rejected=True))
    meta_c, images_c = _kept_images(tmp_path / "c")
    assert sorted(meta_c) == sorted(meta_a) and dropped.keep["dropped"] == ROWS - dropped.keep["kept"] > 0
    assert images_c == {i: data for i, data in images_a.items() if meta_a[i]["kept"]}
    assert {p.stem for p in (tmp_path / "c" / "images").rglob("*.png")} == set(images_c)
    assert invoke("verify", tmp_path / "c").returncode == 0  # rows without an image are whole
    for image_id, row in meta_c.items():
        assert (row["image_path"] is None) == (not row["kept"]) and row["seed"] == meta_a[image_id]["seed"]

    # ... and in a webdataset, the tar holds the kept images only; the rejected rows are in the metadata
    run(manifest, tmp_path / "d", scorer_files, actors=1, batch_size=4, shard_size=3, format="webdataset",
        scoring=spec(scorer_files, keep=rule, max_attempts=3, drop_rejected=True))
    meta_d, _ = read_dataset(tmp_path / "d")
    members = {}
    for tar in sorted((tmp_path / "d" / "shards").glob("*.tar")):
        members |= tar_members(tar)
    assert {i: members[f"{r['key']}.png"] for i, r in meta_d.items() if r["kept"]} == images_c
    assert len(members) == 3 * len(images_c) and all(r["key"] is None for r in meta_d.values() if not r["kept"])
    assert invoke("verify", tmp_path / "d").returncode == 0


@pytest.mark.parametrize("args, message", [
    (["--keep", "clip_score >= 26"], "unknown column 'clip_score'"),
    (["--score", "clip", "--keep", "open('x')"], "open('x') is not allowed"),
    (["--score", "clip,beauty"], "unknown score beauty"),
    (["--score", "nsfw"], "--score nsfw needs --safety-checker (builtin:tiny has no safety checker)"),
    (["--score", "clip"], "--score clip needs --clip-model"),
    (["--score", "aesthetic", "--clip-model", "{clip}"], "--score aesthetic needs --aesthetic-model"),
    (["--score", "clip", "--clip-model", "{missing}"], "--clip-model {missing}: no such file or directory"),
    (["--score", "nsfw", "--safety-checker", "{empty}"], "--safety-checker {empty}: no safety_checker/config.json"),
    (["--score", "nsfw", "--safety-checker", "{sd}/safety_checker"], "name the folder that holds it"),
    (["--score", "aesthetic", "--clip-model", "{clip}", "--aesthetic-model", "{clip}"],
     "--aesthetic-model {clip}: a folder; expected a .safetensors / .pth file"),
    (["--clip-model", "{clip}"], "--clip-model is given, but no --score uses it"),
    (["--max-attempts", "2"], "there is no --keep"),
    (["--keep", "steps < 3", "--max-attempts", "0"], "--max-attempts must be at least 1"),
])
def test_bad_scoring_input_exits_2_before_ray(tmp_path, no_ray, manifest, scorer_files, args, message):  # noqa: F811
    where = {"clip": scorer_files / "clip", "sd": scorer_files / "sd", "missing": tmp_path / "nope",
             "empty": tmp_path / "empty"}
    where["empty"].mkdir()
    result = invoke("run", manifest, "-o", tmp_path / "out", "--model", MODEL, *(a.format(**where) for a in args))
    assert_user_error(result, message.format(**where))
    assert not (tmp_path / "out").exists()


def test_a_scorer_that_does_not_fit_stops_the_job_before_any_shard(tmp_path, local_ray, manifest, scorer_files):
    result = invoke("run", manifest, "-o", tmp_path / "out", "--model", MODEL, "--steps", "2", "--width", "64",
                    "--height", "64", "--score", "aesthetic", "--clip-model", scorer_files / "clip",
                    "--aesthetic-model", scorer_files / "aesthetic-l14.pth")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "sdbatch: error: an actor could not start: WeightsError: --aesthetic-model" in result.stderr
    assert "takes 768-wide image embeddings, but --clip-model gives 32-wide ones" in result.stderr
    assert not list((tmp_path / "out").glob("metadata/*"))


def test_the_model_folder_is_the_default_safety_checker(tmp_path, scorer_files):
    from jobs import driver, sources

    defaulted = driver.with_scorer_defaults(ScoreSpec(("nsfw",)), str(scorer_files / "sd"))
    assert defaulted.safety_checker == str(scorer_files / "sd")
    sources.check(defaulted.safety_checker, layout=sources.SAFETY_CHECKER)
    assert driver.with_scorer_defaults(ScoreSpec(("nsfw",)), MODEL).safety_checker is None
