"""Named ensembles: fitted on a real evaluation job, saved in SQL, used by submit.

Given an evaluation job with two different members and --output, run through
Redis, a worker process, moto_server and PostgreSQL (or SQLite), when
``deblur ensemble fit`` runs, then the weights are non-negative, sum to one,
beat equal weights, match an independent recomputation from the images in S3,
and ``deblur submit --ensemble NAME`` runs exactly those weighted members.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from db.engine import ensure_schema, session_scope
from db.ensembles import (
    EnsembleExistsError,
    UnknownEnsembleError,
    check_name,
    get_ensemble,
    list_ensembles,
    save_ensemble,
)
from jobs.errors import InputError
from jobs.layout import member_folder
from models.catalog import REGISTRY
from producer.ensembles import Member, expand_request, weighted_texts
from producer.submit import JobRequest
from tests.evaluation_stack import MEMBERS, Stack, running_stack, sample_pairs, upload_pairs
from tests.test_end_to_end import run_cli, wait_done

# ------------------------------------------------------------ storage only


@pytest.mark.integration  # runs on PostgreSQL too
def test_saved_ensembles_round_trip_through_the_migrated_schema(database_url: str) -> None:
    ensure_schema(database_url)
    with session_scope(database_url) as session:
        save_ensemble(session, "sharp-set", ["wiener:0.7", "richardson-lucy:0.3"], source_job_id=None,
                      psnr_fitted=30.5, psnr_equal=30.1, images=12)
    with session_scope(database_url) as session:
        row = get_ensemble(session, "sharp-set")
        assert row.members == ["wiener:0.7", "richardson-lucy:0.3"]
        assert row.to_dict()["gain_db"] == pytest.approx(0.4)
        with pytest.raises(EnsembleExistsError, match="'sharp-set' already exists.*--replace"):
            save_ensemble(session, "sharp-set", ["wiener:1"], source_job_id=None, psnr_fitted=None,
                          psnr_equal=None, images=None)
    with session_scope(database_url) as session:
        save_ensemble(session, "sharp-set", ["wiener:1"], source_job_id=None, psnr_fitted=None, psnr_equal=None,
                      images=None, replace=True)
        save_ensemble(session, "another", ["wiener:1"], source_job_id=None, psnr_fitted=None, psnr_equal=None,
                      images=None)
    with session_scope(database_url) as session:
        # the PostgreSQL database is shared by the session's tests: only this test's ensembles are looked at
        assert [e.name for e in list_ensembles(session) if e.name in ("another", "sharp-set")] == ["another",
                                                                                                  "sharp-set"]
        assert get_ensemble(session, "sharp-set").members == ["wiener:1"]
        with pytest.raises(UnknownEnsembleError, match="unknown ensemble 'nope'; known: another, sharp-set"):
            get_ensemble(session, "nope")


@pytest.mark.parametrize("name", ["", " padded", "a:b", "x,y", "n" * 129])
def test_unusable_names_are_refused(name: str) -> None:
    with pytest.raises(InputError, match="ensemble name"):
        check_name(name)


def test_weights_are_spelled_out_and_parse_back() -> None:
    members = [Member(t, REGISTRY.parse(t).key()) for t in MEMBERS]
    texts = weighted_texts(members, [0.6180339887, 0.3819660113])
    assert texts == ["wiener:psf=gaussian:sigma=1.5:0.618034", "richardson-lucy:iterations=10:0.381966"]
    parsed = [REGISTRY.parse(t) for t in texts]
    assert [p.key() for p in parsed] == [m.key for m in members]
    assert [p.weight for p in parsed] == [0.618034, 0.381966]
    assert weighted_texts(members, [1.0, 1e-9]) == ["wiener:psf=gaussian:sigma=1.5:1", "richardson-lucy:iterations=10:0"]


def test_ensemble_and_model_together_are_refused() -> None:
    request = JobRequest(kind="deblur", inputs=["s3://b/in/"], output="s3://b/out/", models=["wiener"],
                         ensemble="fitted")
    with pytest.raises(InputError, match="--ensemble 'fitted' and --model wiener conflict"):
        expand_request(request, settings=None)  # type: ignore[arg-type]  # refused before any lookup


# ------------------------------------------------------------- real jobs

# Under- and over-sharpening members (the pairs are blurred with sigma 1.5):
# their errors partly cancel, so the best mix uses both.
FIT_MEMBERS = ("richardson-lucy:psf=gaussian:sigma=1.5,iterations=10", "wiener:psf=gaussian:sigma=2")


@pytest.fixture(scope="module")
def stack(redis_url: str, s3_endpoint: str, postgres_url: str,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(redis_url, s3_endpoint, postgres_url, tmp_path_factory.mktemp("ensembles")) as running:
        upload_pairs(running.s3, "fit-eval", sample_pairs(3))
        yield running


def _job(*args: str) -> str:
    job = run_cli(*args, "-q").strip()
    info = wait_done(job)
    assert info["status"] == "done" and info["counts"]["failed"] == 0, info
    return job


def _evaluate(*extra: str) -> str:
    return _job("evaluate", "--blurred", "s3://fit-eval/blur/", "--sharp", "s3://fit-eval/sharp/", *extra)


def _fails(*args: str) -> str:
    from producer.cli import main

    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 2, result.output
    return " ".join(result.output.split())


def _read(stack: Stack, key: str) -> np.ndarray:
    data = stack.s3.get_object(Bucket="fit-eval", Key=key)["Body"].read()
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).astype(np.float64) / 255.0


def _mean_psnr(stack: Stack, weights: list[float]) -> float:
    """Mean PSNR of the weighted members over the job's images, from the files in S3."""
    values = []
    for pair in sample_pairs(3):
        outputs = [_read(stack, f"eval/_members/{member_folder(m)}/{pair.relative}") for m in FIT_MEMBERS]
        mix = sum(w * o for w, o in zip(weights, outputs, strict=True))
        values.append(-10 * np.log10(np.mean((mix - _read(stack, "sharp/" + pair.relative)) ** 2)))
    return float(np.mean(values))


@pytest.mark.integration
def test_fit_saves_weights_that_beat_equal_ones_and_submit_uses_them(stack: Stack) -> None:
    job = _evaluate(*[a for m in FIT_MEMBERS for a in ("--model", m)], "--output", "s3://fit-eval/eval/")
    printed = run_cli("ensemble", "fit", job, "--name", "fit-eval-set", "--threads", "2")
    assert "saved as ensemble fit-eval-set" in " ".join(printed.split())

    saved = json.loads(run_cli("ensemble", "list", "--format", "json"))
    entry = next(e for e in saved if e["name"] == "fit-eval-set")
    assert entry["source_job_id"] == job and entry["images"] == 3
    specs = [REGISTRY.parse(text) for text in entry["members"]]
    assert [s.key() for s in specs] == [REGISTRY.parse(m).key() for m in FIT_MEMBERS]
    weights = [s.weight for s in specs]
    assert all(w > 0 for w in weights), f"complementary members should both be used: {weights}"
    assert sum(weights) == pytest.approx(1, abs=1e-5)
    assert entry["psnr_fitted"] >= entry["psnr_equal"]
    assert re.search(rf"gain \+{entry['gain_db']:.3f} dB", " ".join(printed.split()))
    # independent check on the member outputs read back from S3
    assert entry["psnr_equal"] == pytest.approx(_mean_psnr(stack, [0.5, 0.5]), abs=1e-6)
    assert entry["psnr_fitted"] == pytest.approx(_mean_psnr(stack, weights), abs=1e-3)

    used = entry["members"]
    restored = _job("submit", "s3://fit-eval/blur/", "--output", "s3://fit-eval/restored/",
                    "--ensemble", "fit-eval-set")
    status = json.loads(run_cli("status", restored, "--format", "json"))
    assert status["spec"]["models"] == [REGISTRY.parse(t).to_text() for t in used]
    assert status["spec"]["ensemble"] == "fit-eval-set"
    rows = json.loads(run_cli("results", restored, "--format", "json"))
    assert {k for r in rows for k in r["model_versions"]} == {REGISTRY.parse(t).key() for t in used}

    assert "already exists" in _fails("ensemble", "fit", job, "--name", "fit-eval-set")
    assert "conflict" in _fails("submit", "s3://fit-eval/blur/", "--output", "s3://fit-eval/x/",
                                "--ensemble", "fit-eval-set", "--model", "wiener")
    unknown = _fails("evaluate", "--blurred", "s3://fit-eval/blur/", "--sharp", "s3://fit-eval/sharp/",
                     "--ensemble", "nope")
    assert re.search(r"unknown ensemble 'nope'; known: .*fit-eval-set", unknown)


@pytest.mark.integration
def test_fit_names_what_is_wrong_with_the_job(stack: Stack) -> None:
    single = _evaluate("--model", MEMBERS[0], "--output", "s3://fit-eval/single/")
    assert "evaluated a single model" in _fails("ensemble", "fit", single, "--name", "x")
    unsaved = _evaluate(*[a for m in FIT_MEMBERS for a in ("--model", m)])
    assert "ran without --output" in _fails("ensemble", "fit", unsaved, "--name", "x")
    deblur = _job("submit", "s3://fit-eval/blur/", "--output", "s3://fit-eval/deblurred/", "--model", MEMBERS[0])
    assert "is a deblur job" in _fails("ensemble", "fit", deblur, "--name", "x")
    assert "no job with id" in _fails("ensemble", "fit", "00000000-0000-0000-0000-000000000000", "--name", "x")
    aligned = _evaluate(*[a for m in FIT_MEMBERS for a in ("--model", m)], "--output", "s3://fit-eval/aligned/",
                        "--align")
    assert "was evaluated with --align" in _fails("ensemble", "fit", aligned, "--name", "x")


def test_a_fit_measures_the_centre_without_the_border_or_alpha() -> None:
    """The fit measured pixels the job's own metrics left out (its border crop, alpha), and held whole scans in
    memory (200 of 12 megapixels with three members: about 29 GB) to sample 200,000 pixels of them."""
    import numpy as np

    from producer.ensembles import FIT_SIDE, _fit_region

    scan = np.zeros((3000, 2000, 4), np.uint8)
    region = _fit_region(scan, border=8)
    assert region.shape == (FIT_SIDE, FIT_SIDE, 3)
    small = np.arange(40 * 30 * 3, dtype=np.uint16).reshape(40, 30, 3)
    np.testing.assert_array_equal(_fit_region(small, border=4), small[4:-4, 4:-4])


@pytest.mark.integration
def test_fit_explains_missing_member_outputs(stack: Stack) -> None:
    job = _evaluate(*[a for m in FIT_MEMBERS for a in ("--model", m)], "--output", "s3://fit-eval/gone/")
    listed = stack.s3.list_objects_v2(Bucket="fit-eval", Prefix="gone/_members/")["Contents"]
    for obj in listed:
        stack.s3.delete_object(Bucket="fit-eval", Key=obj["Key"])
    assert "has no member outputs under s3://fit-eval/gone/_members/" in _fails(
        "ensemble", "fit", job, "--name", "x")
