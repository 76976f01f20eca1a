"""The recipe: shipped configs validate, batch semantics, radiograph-safe augmentation, lineage hash."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.config import TrainConfig, load_config
from training.errors import ConfigError

pytestmark = pytest.mark.unit

CONFIGS = Path(__file__).resolve().parents[3] / "training" / "configs"


@pytest.mark.parametrize("name", ["cpu-small.yaml", "gpu-large.yaml", "bootstrap.yaml"])
def test_shipped_configs_load(name: str) -> None:
    config = load_config(CONFIGS / name)
    assert config.imgsz % 32 == 0
    assert config.checkpoint.max_failures >= 1


def test_gpu_config_is_yolo11l_at_1024_on_gpus() -> None:
    config = load_config(CONFIGS / "gpu-large.yaml")
    assert (config.model, config.imgsz, config.scaling.use_gpu) == ("yolo11l", 1024, True)


def test_the_slim_model_is_yolo11_at_half_the_width_of_n_from_any_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ultralytics.nn.tasks import DetectionModel

    monkeypatch.chdir(tmp_path)  # the packaged file, not one beside the caller
    path = Path(str(TrainConfig(model="yolo11-slim").ultralytics_overrides()["model"]))
    assert path.is_file() and path.is_absolute()
    slim = DetectionModel(str(path), nc=14, verbose=False)
    nano = DetectionModel("yolo11n.yaml", nc=14, verbose=False)
    assert len(slim.model) == len(nano.model)  # the same layers
    assert next(slim.parameters()).shape[0] * 2 == next(nano.parameters()).shape[0]  # stem: half n's filters
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in nano.parameters()) / 3


def test_global_batch_is_per_worker_batch_times_workers() -> None:
    config = TrainConfig(batch_per_worker=6).with_workers(3)
    assert config.global_batch == 18
    # ultralytics divides its `batch` by the world size, so it must receive the global batch
    assert config.ultralytics_overrides()["batch"] == 18


def test_overrides_never_flip_vertically_and_keep_configured_horizontal_flip() -> None:
    overrides = TrainConfig(augment={"fliplr": 0.25}).ultralytics_overrides()
    assert overrides["flipud"] == 0.0
    assert overrides["fliplr"] == 0.25
    assert overrides["hsv_h"] == overrides["hsv_s"] == 0.0


def test_config_hash_is_stable_and_tracks_changes() -> None:
    a, b = TrainConfig(), TrainConfig()
    assert a.sha256() == b.sha256()
    assert TrainConfig(optim={"lr0": 0.02}).sha256() != a.sha256()


def test_unknown_key_is_a_config_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nepochz: 3\n")
    with pytest.raises(ConfigError, match="epochz"):
        load_config(path)


def test_imgsz_must_be_a_stride_multiple(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("imgsz: 100\n")
    with pytest.raises(ConfigError, match="multiple of 32"):
        load_config(path)


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_s3_keys_fall_back_to_the_stack_credentials_file(tmp_path: Path) -> None:
    from training.config import TrainSettings

    (tmp_path / "credentials.json").write_text('{"s3": {"access_key": "AK", "secret_key": "SK"}}')
    assert TrainSettings(stack_dir=tmp_path, s3_access_key="", s3_secret_key="").s3_keys() == (
        "AK",
        "SK",
    )
    explicit = TrainSettings(stack_dir=tmp_path, s3_access_key="env-ak", s3_secret_key="env-sk")
    assert explicit.s3_keys() == ("env-ak", "env-sk")


def test_fine_tuning_trains_the_base_models_architecture_not_the_recipes() -> None:
    recipe = TrainConfig(model="yolo11n")
    assert recipe.fine_tuning("yolo11-slim").model == "yolo11-slim"  # a slim v1 fine-tuned stays slim
    assert recipe.fine_tuning("yolo11n") is recipe
    assert recipe.fine_tuning(None).model == "yolo11n"  # a run that did not record it: the recipe's
    assert recipe.fine_tuning("resnet50").model == "yolo11n"  # not an architecture this code builds


def test_every_override_is_an_ultralytics_argument_and_the_loss_section_reaches_it() -> None:
    from ultralytics.cfg import DEFAULT_CFG_DICT

    overrides = TrainConfig(loss={"cls": 1.0, "cls_pw": 0.5}).ultralytics_overrides()
    assert set(overrides) <= set(DEFAULT_CFG_DICT), set(overrides) - set(DEFAULT_CFG_DICT)
    assert (overrides["box"], overrides["cls"], overrides["dfl"], overrides["cls_pw"]) == (7.5, 1.0, 1.5, 0.5)
    with pytest.raises(ValueError, match="cls_pw"):
        TrainConfig(loss={"cls_pw": 1.5})


def test_checkpoints_fall_every_n_epochs_and_always_at_the_last() -> None:
    from training.config import CheckpointConfig

    every3 = CheckpointConfig(every_epochs=3)
    assert [e + 1 for e in range(8) if every3.due(e, 8)] == [3, 6, 8]
    assert [e + 1 for e in range(4) if CheckpointConfig().due(e, 4)] == [1, 2, 3, 4]


def test_tune_trials_checkpoint_every_epoch_and_the_tuned_recipe_keeps_the_recipes_cadence() -> None:
    from training.tune_space import apply_trial, tuned_config

    recipe = TrainConfig(checkpoint={"every_epochs": 4})
    params = {"imgsz": 160, "epochs": 8, "lr0": 0.002, "augment_strength": 1.0}
    assert apply_trial(recipe, params).checkpoint.every_epochs == 1  # ASHA stops trials at any epoch
    assert tuned_config(recipe, params).checkpoint.every_epochs == 4
