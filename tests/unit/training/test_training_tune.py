"""`cxr train tune` without Ray: option checks, the search space, trial recipes, the best trial, the YAML."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from training.cli import app
from training.config import TrainConfig, TrainSettings, load_config
from training.errors import ConfigError
from training.tune import check_budget, max_concurrent_trials
from training.tune_outcomes import TrialOutcome, classify, pick_best, write_tuned_config
from training.tune_space import TuneSpace, apply_trial, load_space, tuned_config
from training.tune_tracking import search_tracking

pytestmark = pytest.mark.unit

RECIPE = TrainConfig(name="cxr-cpu", imgsz=256, epochs=50)


@pytest.fixture
def recipe_file(tmp_path: Path) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text("name: t\n")
    return path


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--trials", "0"], "--trials"),
        (["--trials", "-3"], "--trials"),
        (["--budget-minutes", "0"], "--budget-minutes"),
        (["--budget-minutes", "-1"], "--budget-minutes"),
    ],
)
def test_tune_refuses_no_trials_and_no_time_before_starting_anything(
    recipe_file: Path, args: list[str], complaint: str
) -> None:
    result = CliRunner().invoke(app, ["tune", "--config", str(recipe_file), *args])
    assert result.exit_code == 2, result.output
    assert complaint in result.output
    assert "Traceback" not in result.output


def test_the_python_api_checks_the_budget_too() -> None:
    with pytest.raises(ConfigError, match="trials"):
        check_budget(0, 10)
    with pytest.raises(ConfigError, match="budget"):
        check_budget(4, 0.0)
    check_budget(1, 0.5)


def test_default_space_stays_within_the_recipe() -> None:
    space = TuneSpace().resolved(RECIPE)
    assert space.imgsz == [128, 192, 256]
    assert space.epochs == [25, 37, 50]
    assert space.lr0 == pytest.approx((RECIPE.optim.lr0 / 10, RECIPE.optim.lr0 * 10))
    assert set(space.param_space()) == {"lr0", "augment_strength", "imgsz", "epochs"}


def test_a_tiny_recipe_keeps_at_least_its_own_size() -> None:
    space = TuneSpace().resolved(TrainConfig(imgsz=64, epochs=1))
    assert space.imgsz == [64] and space.epochs == [1]


def test_space_choices_above_the_recipe_or_off_stride_are_refused() -> None:
    with pytest.raises(ConfigError, match="imgsz"):
        TuneSpace(imgsz=[288]).resolved(RECIPE)
    with pytest.raises(ConfigError, match="epochs"):
        TuneSpace(epochs=[60]).resolved(RECIPE)
    with pytest.raises(ValidationError, match="multiples of 32"):
        TuneSpace(imgsz=[100])
    with pytest.raises(ValidationError, match="low < high"):
        TuneSpace(lr0=(0.1, 0.01))
    with pytest.raises(ConfigError, match="resolve"):
        TuneSpace().param_space()


def test_space_yaml_is_read_and_typos_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "space.yaml"
    path.write_text("lr0: [0.001, 0.01]\nimgsz: [128, 256]\nmetric: val/mAP50-95\n")
    space = load_space(path)
    assert space.lr0 == (0.001, 0.01) and space.imgsz == [128, 256] and space.metric == "val/mAP50-95"
    path.write_text("learning_rate: [0.001, 0.01]\n")
    with pytest.raises(ConfigError, match="invalid"):
        load_space(path)


def test_a_trial_recipe_scales_augmentations_within_their_limits() -> None:
    recipe = TrainConfig(val_every_epoch=False)
    trial = apply_trial(recipe, {"lr0": 0.0031234567, "augment_strength": 4.0, "imgsz": 128, "epochs": 3})
    assert trial.optim.lr0 == pytest.approx(0.00312346)
    assert (trial.imgsz, trial.epochs, trial.val_every_epoch) == (128, 3, True)  # ASHA needs every epoch
    assert trial.augment.mosaic == 1.0 and trial.augment.scale == 0.9 and trial.augment.translate == 0.4
    assert trial.augment.hsv_v == pytest.approx(1.0) and trial.augment.degrees == pytest.approx(12.0)
    assert trial.augment.fliplr == recipe.augment.fliplr == 0.0  # never flipped: dextrocardia
    assert trial.augment.close_mosaic == recipe.augment.close_mosaic
    weaker = apply_trial(recipe, {"lr0": 0.01, "augment_strength": 0.5, "imgsz": 320, "epochs": 30})
    assert weaker.augment.hsv_v == pytest.approx(0.15) and weaker.augment.scale == pytest.approx(0.15)


def test_the_tuned_recipe_keeps_the_recipes_scale_and_name() -> None:
    recipe = TrainConfig(name="cxr-cpu", val_every_epoch=False).with_workers(4)
    tuned = tuned_config(recipe, {"lr0": 0.002, "augment_strength": 1.0, "imgsz": 256, "epochs": 20})
    assert tuned.name == "cxr-cpu-tuned" and tuned.scaling.num_workers == 4
    assert tuned.val_every_epoch is False and tuned.optim.lr0 == 0.002 and tuned.augment == recipe.augment


def _outcome(trial_id: str, metric: float | None, outcome: str = "completed") -> TrialOutcome:
    return TrialOutcome(trial_id, 0.01, 1.0, 64, 2, 2, outcome, metric)  # type: ignore[arg-type]


def test_the_best_trial_ignores_failures_and_nan_and_follows_the_mode() -> None:
    trials = [
        _outcome("a", 0.2),
        _outcome("b", 0.9, "failed"),
        _outcome("c", math.nan),
        _outcome("d", 0.5, "stopped"),
        _outcome("e", 0.1),
    ]
    best_max = pick_best(trials, "max")
    best_min = pick_best(trials, "min")
    assert best_max is not None and best_max.trial_id == "d"
    assert best_min is not None and best_min.trial_id == "e"
    tied = pick_best([_outcome("x", 0.0), _outcome("y", 0.0)], "max")
    assert tied is not None and tied.trial_id == "x"  # reproducible: the earlier trial
    assert pick_best([_outcome("f", None), _outcome("g", 1.0, "failed")], "max") is None


def test_outcomes_say_how_a_trial_ended() -> None:
    assert classify(epochs=3, epochs_run=3, failed=False) == "completed"
    assert classify(epochs=3, epochs_run=1, failed=False) == "stopped"
    assert classify(epochs=3, epochs_run=3, failed=True) == "failed"


def test_concurrency_follows_the_limiting_resource() -> None:
    one = TrainConfig().with_workers(1)
    assert max_concurrent_trials(one, 8, {"CPU": 2.0}) == 2
    assert max_concurrent_trials(one, 1, {"CPU": 16.0}) == 1
    assert max_concurrent_trials(TrainConfig().with_workers(2), 8, {"CPU": 2.0}) == 1
    assert max_concurrent_trials(TrainConfig().with_workers(4), 8, {"CPU": 2.0}) == 1  # never zero
    gpu = TrainConfig.model_validate({"scaling": {"num_workers": 2, "use_gpu": True, "gpus_per_worker": 1}})
    assert max_concurrent_trials(gpu, 8, {"CPU": 64.0, "GPU": 4.0}) == 2


def test_the_written_recipe_loads_back_as_the_same_config(tmp_path: Path) -> None:
    config = tuned_config(RECIPE, {"lr0": 0.004, "augment_strength": 0.8, "imgsz": 192, "epochs": 37})
    path = write_tuned_config(
        config,
        tmp_path / "c" / "t.yaml",
        search_name="s",
        parent_run_id="p",
        best=_outcome("a", 0.3),
        metric="m",
    )
    assert path.read_text().startswith("# Written by `cxr train tune`")
    assert load_config(path) == config


def test_searches_log_to_their_own_experiment_not_the_one_alerts_read() -> None:
    settings = TrainSettings(mlflow_experiment="cxr-detector", mlflow_uri="http://127.0.0.1:9")
    tracking = search_tracking(settings)
    assert tracking.mlflow_experiment == "cxr-detector-tune" and tracking.mlflow_uri == settings.mlflow_uri
