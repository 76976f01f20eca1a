"""Registry lookups: a malformed version number is the caller's mistake, not an unreachable MLflow."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.errors import RegistryError, RegistryUnreachable
from training.registry import DESCRIPTION_LIMIT, LineageTags, ModelRegistry

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("version", ["v3", "3.0", "", "latest"])
def test_a_version_that_is_not_a_number_is_a_registry_error_not_an_outage(
    tmp_path: Path, version: str
) -> None:
    registry = ModelRegistry(f"sqlite:///{tmp_path / 'mlflow.db'}", "cxr-detector")
    with pytest.raises(RegistryError, match="not a version number") as caught:
        registry.facts(version)
    # RegistryUnreachable lets delivery fall back on a cached model and tells the user to check the stack
    assert not isinstance(caught.value, RegistryUnreachable)


def _lineage() -> LineageTags:
    return LineageTags(
        dataset_version="d" * 64,
        git_commit="c" * 40,
        config_sha256="a" * 64,
        onnx_sha256="b" * 64,
        map50=0.5,
        map40=0.6,
        parity_max_abs_diff=1e-5,
        imgsz=640,
        classes=14,
    )


def test_a_model_card_longer_than_mlflows_description_column_still_registers_within_it(
    tmp_path: Path,
) -> None:
    """A full card (operating points, subgroups) runs past 5000 characters: PostgreSQL's
    ``model_versions.description`` (VARCHAR(5000)) would refuse it after the whole training.
    SQLite stores anything, so the test checks the length written."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    registry = ModelRegistry(uri, "cxr-detector")
    client = registry._client
    run = client.create_run(client.create_experiment("e", artifact_location=str(tmp_path / "art")))
    card = "# cxr-detector\n" + "".join(f"| {i} | finding | 0.500 |\n" for i in range(400))
    assert len(card) > DESCRIPTION_LIMIT
    version = registry.register(run.info.run_id, _lineage(), card)
    stored = client.get_model_version("cxr-detector", version).description
    assert len(stored) <= DESCRIPTION_LIMIT and stored.startswith("# cxr-detector")
    assert "model_card.md" in stored  # says where the full card is

    body = "| class | Δ AP@0.4 |\n" + "| 0 | +0.01 |\n" * 40
    registry.record_section(version, "## Golden set comparison (promotion to staging)", body, tags={})
    recorded = client.get_model_version("cxr-detector", version).description
    assert len(recorded) <= DESCRIPTION_LIMIT
    assert recorded.rstrip().endswith(body.strip())  # the section a reviewer reads is kept whole


def _golden_section(stage: str) -> str:
    """About the size of delivery's golden table: a verdict line and one row per class."""
    rows = "".join(f"| class {i:02d} ({stage}) | 12 | +0.0100 | [-0.0200, +0.0400] |\n" for i in range(14))
    return f"mAP@0.4 v3 - v2 = +0.0100 ({stage})\n\n| class | instances | Δ AP@0.4 | 95% CI |\n{rows}"


@pytest.mark.parametrize(
    ("rows", "cut_at_registration"),
    [
        (400, True),  # cut already: each new section was cut from the card's end, where the others were
        (120, False),  # fits with its first section: the next overflowing one read the earlier as card text
    ],
)
def test_each_stages_recorded_section_survives_the_next_promotion(
    tmp_path: Path, rows: int, cut_at_registration: bool
) -> None:
    """staging, canary, production: each promotion records its golden table, and all three stay."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    registry = ModelRegistry(uri, "cxr-detector")
    client = registry._client
    run = client.create_run(client.create_experiment("e", artifact_location=str(tmp_path / "art")))
    card = "# cxr-detector\n" + "".join(f"| {i} | finding | 0.500 |\n" for i in range(rows))
    version = registry.register(run.info.run_id, _lineage(), card)
    registered = client.get_model_version("cxr-detector", version).description
    assert ("model_card.md" in registered) == cut_at_registration
    stages = ("staging", "canary", "production")
    for stage in stages:
        heading = f"## Golden set comparison (promotion to {stage})"
        registry.record_section(version, heading, _golden_section(stage), tags={})
    recorded = client.get_model_version("cxr-detector", version).description
    assert len(recorded) <= DESCRIPTION_LIMIT and recorded.startswith("# cxr-detector")
    assert recorded.count("model_card.md") == 1
    for stage in stages:
        heading = f"## Golden set comparison (promotion to {stage})"
        assert f"{heading}\n{_golden_section(stage).strip()}\n" in recorded, stage


def test_recorded_sections_past_the_tail_limit_go_whole_oldest_first() -> None:
    from training.registry import TRUNCATION_NOTE, fit_description

    sections = [f"\n\n## Section {i}\n" + f"| row {i} |\n" * 120 for i in range(5)]
    fitted = fit_description("# card\n" + "x" * 6000, "".join(sections))
    assert len(fitted) <= DESCRIPTION_LIMIT and fitted.count(TRUNCATION_NOTE) == 1
    kept = [s for s in sections if s in fitted]
    assert kept == sections[-len(kept) :] and kept  # the newest, each whole
    assert fitted.endswith(sections[-1]) and fitted.count("## Section") == len(kept)  # none cut in two
