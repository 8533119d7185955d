"""Model specs and pulls that misled: huge ensemble weights, a misspelt parameter blamed on its neighbour,
'nothing to pull' for models that need weights, and official entries whose architecture pull checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from jobs.errors import InvalidModelSpecError, WeightsError
from models.catalog import LEARNED_OFFICIAL, REGISTRY, parse_ensemble
from models.cli import models_group
from models.official import build_named  # noqa: F401 - before the extra architectures: it quietens their import
from models.registry import EnsembleSpec, ModelSpec
from models.weights_store import architecture_problem
from tests.test_official import ARCHITECTURES


def test_weights_that_overflow_together_are_refused_when_the_ensemble_is_parsed() -> None:
    """Two weights of 1e308 are each finite, but their sum is not: every image failed in the worker with
    'OverflowError: intermediate overflow in fsum'."""
    texts = ["wiener:psf=motion:length=7,angle=30:1e308", "richardson-lucy:psf=gaussian:sigma=1:1e308"]
    with pytest.raises(InvalidModelSpecError, match="add up to more than the largest number.*only their ratios"):
        parse_ensemble(texts)
    assert parse_ensemble(["wiener:1e308", "richardson-lucy:1"]).normalised_weights()[0] == pytest.approx(1.0)


@pytest.mark.parametrize("weight", [float("inf"), float("nan"), -1.0])
def test_a_member_weight_that_is_not_finite_is_refused_even_built_directly(weight: float) -> None:
    with pytest.raises(InvalidModelSpecError, match="must be a finite number >= 0"):
        EnsembleSpec((ModelSpec("wiener", weight=weight),)).normalised_weights()


@pytest.mark.parametrize("text", ["wiener:inf", "wiener:nan", "wiener:1e309", "wiener:psf=disk:radius=2:inf"])
def test_a_weight_that_is_not_finite_is_refused_where_it_is_parsed(text: str) -> None:
    with pytest.raises(InvalidModelSpecError, match="ensemble weight must be a finite number"):
        REGISTRY.parse(text)


@pytest.mark.parametrize("text", ["l0-blind:kernel=31,lamda=0.01", "l0-blind:lamda=0.01"])
def test_a_misspelt_parameter_is_named_not_blamed_on_its_neighbour(text: str) -> None:
    with pytest.raises(InvalidModelSpecError) as caught:
        REGISTRY.parse(text)
    message = str(caught.value)
    assert "unknown parameter 'lamda' for l0-blind; its parameters are: kernel, lambda," in message
    assert "did you mean 'lambda'?" in message and "whole number" not in message


def test_a_psf_keeps_its_own_key_value_parts_after_a_comma() -> None:
    spec = REGISTRY.parse("wiener:psf=motion:length=7,angle=30,nsr=0.1:2")
    assert spec.param_dict == {"psf": "motion:length=7,angle=30", "nsr": 0.1} and spec.weight == 2.0
    # a misspelt part of the PSF is the PSF's to report
    with pytest.raises(InvalidModelSpecError, match="PSF 'motion' takes length, angle; got 'agle=30'"):
        REGISTRY.parse("wiener:psf=motion:length=7,agle=30")


def test_a_piece_without_a_key_still_belongs_to_the_previous_value() -> None:
    assert REGISTRY.parse("seed003-vit:weights=/runs/a,b.safetensors").param_dict["weights"] == "/runs/a,b.safetensors"
    with pytest.raises(InvalidModelSpecError, match="parameter 'kernel': expected a whole number, got '31,5'"):
        REGISTRY.parse("l0-blind:kernel=31,5")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("spandrel", "loads the file its path= parameter names (spandrel:path=/path/to/model.pth"),
        ("seed003-vit", "ships no weights and has none to download: train them with 'deblur train seed003-vit"),
    ],
)
def test_pull_says_what_a_model_without_a_weights_file_needs(name: str, expected: str) -> None:
    """Both need weights; 'needs no weights file; nothing to pull' told operators otherwise."""
    result = CliRunner().invoke(models_group, ["pull", name], catch_exceptions=False)
    assert result.exit_code == 1
    assert expected in result.output and "needs no weights" not in result.output
    assert "needs no weights" in CliRunner().invoke(models_group, ["pull", "wiener"]).output


@pytest.mark.parametrize("entry", [e for e in LEARNED_OFFICIAL if e.weights is not None], ids=lambda e: e.name)
def test_pull_knows_the_network_of_every_official_entry(tmp_path: Path, entry) -> None:  # type: ignore[no-untyped-def]
    """The network the catalog records is the one the entry's loader accepts: its own checkpoint passes, one of
    another entry's network does not."""
    own, other = tmp_path / "own.pth", tmp_path / "other.pth"
    torch.save({"params": ARCHITECTURES[entry.name][0]().state_dict()}, own)
    another = "fftformer-gopro" if entry.name == "nafnet-gopro" else "nafnet-gopro"
    torch.save({"params": ARCHITECTURES[another][0]().state_dict()}, other)
    assert architecture_problem(entry, own) is None
    problem = architecture_problem(entry, other)
    assert problem is not None and problem[0] is WeightsError and f"not the {entry.architecture} network" in problem[1]
