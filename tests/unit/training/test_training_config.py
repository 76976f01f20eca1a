"""The recipe: shipped configs validate, batch semantics, radiograph-safe augmentation, lineage hash."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.config import TrainConfig, load_config
from training.errors import ConfigError

pytestmark = pytest.mark.unit

CONFIGS = Path(__file__).resolve().parents[3] / "training" / "configs"


@pytest.mark.parametrize("name", ["cpu-small.yaml", "gpu-large.yaml"])
def test_shipped_configs_load(name: str) -> None:
    config = load_config(CONFIGS / name)
    assert config.imgsz % 32 == 0
    assert config.checkpoint.max_failures >= 1


def test_gpu_config_is_yolo11l_at_1024_on_gpus() -> None:
    config = load_config(CONFIGS / "gpu-large.yaml")
    assert (config.model, config.imgsz, config.scaling.use_gpu) == ("yolo11l", 1024, True)


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
