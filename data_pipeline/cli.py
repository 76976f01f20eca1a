"""``cxr data``: synth | ingest | validate | fetch | report.

Thin wrappers: parse options, call the library, print a summary table, and
turn the package's typed errors into one red line and exit code 1 (never a
traceback for bad input).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from core.errors import CxrError
from data_pipeline.config import DataSettings
from data_pipeline.errors import AnnotationError, StoreError

if TYPE_CHECKING:
    from data_pipeline.golden import GoldenPin
    from data_pipeline.store import ObjectStore

app = typer.Typer(
    help="Data pipeline: synthetic phantoms, dataset builds, annotation checks.", no_args_is_help=True
)
console = Console(stderr=True)
log = logging.getLogger(__name__)

# 50x VinDr-CXR's 18,000 images; and the largest square the DICOM guard's default
# CXR_DICOM_MAX_PIXELS (50 M) lets ingest read: a bigger phantom would be refused there anyway
SYNTH_MAX_IMAGES = 1_000_000
SYNTH_MAX_SIDE = 7071


def _plain(value: object) -> Text:
    """Text from files, paths, settings or errors, printed as is: ``[/x]`` in it is not rich markup."""
    return Text(str(value))


def _error_line(message: object, label: str = "error:", style: str = "bold red") -> Text:
    return Text.assemble((label, style), " ", str(message))


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log key=value lines")] = False,
) -> None:
    from core.offline import apply_offline_env

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s %(message)s"
    )
    apply_offline_env(_settings().stack_dir)


def _settings(**overrides: object) -> DataSettings:
    """Settings from CXR_* plus command-line overrides; a bad value is one red line, not a traceback."""
    try:
        return DataSettings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        console.print(_error_line(f"invalid setting (CXR_* variable or option): {problems}"))
        raise typer.Exit(2) from exc


@contextmanager
def _friendly_errors() -> Iterator[None]:
    try:
        yield
    except CxrError as exc:
        console.print(_error_line(exc))
        raise typer.Exit(1) from exc


@app.command()
def synth(
    out: Annotated[Path, typer.Option(help="output folder (gets dicom/, annotations.csv, truth.csv)")],
    # bounds, so a typo is a usage error and not a traceback deep in numpy or OpenCV (a negative
    # seed; a side past OpenCV's int), or a loop that never ends (10**20 images)
    n_images: Annotated[int, typer.Option(min=1, max=SYNTH_MAX_IMAGES, help="number of radiographs")] = 200,
    seed: Annotated[int, typer.Option(min=0, help="same seed, same files")] = 0,
    readers: Annotated[int, typer.Option(min=1, help="simulated radiologists per image")] = 3,
    size: Annotated[
        int | None,
        typer.Option(min=64, max=SYNTH_MAX_SIDE, help="square side in px (default: 1800-3000 random)"),
    ] = None,
    no_finding_fraction: Annotated[float, typer.Option(min=0, max=1)] = 0.35,
    compressed_fraction: Annotated[float, typer.Option(min=0, max=1, help="share RLE/JPEG-LS/J2K")] = 0.2,
    workers: Annotated[int, typer.Option(min=0, help="processes; 0 = all CPUs")] = 0,
) -> None:
    """Generate synthetic chest radiographs (DICOM) with findings and reader annotations (VinDr layout)."""
    from data_pipeline.synth import SynthConfig, generate

    config = SynthConfig(
        n_images=n_images,
        seed=seed,
        size=size,
        readers=readers,
        no_finding_fraction=no_finding_fraction,
        compressed_fraction=compressed_fraction,
        workers=workers,
    )
    started = time.perf_counter()
    with _friendly_errors(), _progress() as progress:
        task = progress.add_task("synthesize", total=n_images)
        result = generate(config, out, progress=lambda n: progress.advance(task, n))
    seconds = time.perf_counter() - started
    syntaxes: dict[str, int] = {}
    for case in result.cases:
        syntaxes[case.transfer_syntax] = syntaxes.get(case.transfer_syntax, 0) + 1
    table = Table(title=_plain(f"synthetic set in {out}"))
    table.add_column("item")
    table.add_column("value", justify="right")
    table.add_row("images", str(len(result.cases)))
    table.add_row("images with findings", str(sum(1 for c in result.cases if c.findings)))
    table.add_row("patients", str(len({c.patient_id for c in result.cases})))
    table.add_row("MONOCHROME1", str(sum(1 for c in result.cases if c.photometric == "MONOCHROME1")))
    for uid, n in sorted(syntaxes.items()):
        table.add_row(f"transfer syntax {_uid_name(uid)}", str(n))
    table.add_row("seconds", f"{seconds:.1f}")
    Console().print(table)
    typer.echo(str(result.annotations_csv))


def _uid_name(uid: str) -> str:
    from pydicom.uid import UID

    return UID(uid).name


@contextmanager
def _progress() -> Iterator[Progress]:
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        yield progress


@app.command()
def ingest(
    dicom_dir: Annotated[Path, typer.Option(help="folder of <image_id>.dicom (or .dcm/.png/.jpg) files")],
    annotations: Annotated[Path, typer.Option(help="VinDr-CXR CSV")],
    out: Annotated[Path, typer.Option(help="datasets root; the version goes to <out>/<version>/")],
    upload: Annotated[
        str, typer.Option(help="auto: publish to S3 when reachable; yes: must publish; no: local only")
    ] = "auto",
    feedback: Annotated[
        bool, typer.Option(help="merge radiologists' feedback rows from S3 feedback/")
    ] = True,
    max_side: Annotated[int | None, typer.Option(help="longer side of exported PNGs (CXR_MAX_SIDE)")] = None,
    workers: Annotated[int | None, typer.Option(help="processes (CXR_WORKERS; 0 = all CPUs)")] = None,
) -> None:
    """Decode, fuse readers, check, split by patient, export YOLO, version, publish.

    The pinned golden set's patients (training/golden.yaml) are kept out of every split.
    """
    from data_pipeline.golden import held_out_patients
    from data_pipeline.ingest import build_dataset

    overrides = {k: v for k, v in {"max_side": max_side, "workers": workers}.items() if v is not None}
    settings = _settings(**overrides)
    with _friendly_errors():
        store = _store(settings, upload)
        build = build_dataset(
            dicom_dir,
            annotations,
            out,
            settings=settings,
            store=store,
            feedback=feedback,
            console=console,
            exclude_patients=held_out_patients(settings, store),
            cache_dir=settings.cache_dir(),
        )
    assert build.quality is not None
    build.quality.render(Console())
    counts = build.manifest["counts"]
    table = Table(title=_plain(f"dataset {build.version}"))
    table.add_column("item")
    table.add_column("value", justify="right")
    for split_name, n in counts["images"].items():
        table.add_row(f"images {split_name}", str(n))
    table.add_row("path", _plain(build.path))
    table.add_row(
        "published to S3", f"{settings.s3_bucket}/datasets/{build.version}/" if build.published else "no"
    )
    table.add_row("report", _plain(build.report) if build.report else "none (see the log)")
    table.add_row("reused existing build", str(build.reused))
    table.add_row("seconds", f"{build.seconds:.1f}")
    table.add_row("images/s", f"{build.images_per_second:.1f}")
    Console().print(table)
    typer.echo(build.version)


def _store(settings: DataSettings, upload: str) -> ObjectStore | None:
    """The S3 store to publish to: ``auto`` falls back to local only, ``yes`` insists, ``no`` skips."""
    from data_pipeline.store import ObjectStore

    if upload not in ("auto", "yes", "no"):
        raise typer.BadParameter("--upload must be auto, yes or no")
    if upload == "no":
        return None
    try:
        store = ObjectStore.from_env(settings)
        store.ensure_bucket()
        return store
    except StoreError as exc:
        if upload == "yes":
            raise
        console.print(_error_line(exc, "S3 not reachable, building locally only:", "yellow"))
        return None


golden_app = typer.Typer(help="The frozen evaluation set promotion gates compare on", no_args_is_help=True)
app.add_typer(golden_app, name="golden")


@golden_app.command("build")
def golden_build(
    dicom_dir: Annotated[Path, typer.Option(help="folder of <image_id>.dicom (or .dcm/.png/.jpg) files")],
    annotations: Annotated[Path, typer.Option(help="VinDr-CXR CSV with the images' true findings")],
    out: Annotated[Path, typer.Option(help="datasets root; the version goes to <out>/<version>/")],
    upload: Annotated[str, typer.Option(help="auto | yes | no, as for ingest")] = "auto",
    pin: Annotated[bool, typer.Option(help="write training/golden.yaml in CXR_GITOPS_DIR")] = True,
    commit: Annotated[bool, typer.Option(help="commit the pin if CXR_GITOPS_DIR is a git repo")] = True,
) -> None:
    """Build a golden set (every image in its test split, never LATEST) and pin it."""
    from data_pipeline.golden import GoldenError, commit_pin, describe, pin_path, write_pin
    from data_pipeline.ingest import build_dataset
    from data_pipeline.versioning import publish

    settings = _settings()
    with _friendly_errors():
        store = _store(settings, upload)
        # built locally first: a refused set is published nowhere
        build = build_dataset(
            dicom_dir,
            annotations,
            out,
            settings=settings,
            store=None,
            feedback=False,
            console=console,
            golden=True,
        )
        described = describe(build.path)
        if described.images < settings.golden_min_images:
            raise GoldenError(
                f"golden set {build.version} has {described.images} images, fewer than "
                f"CXR_GOLDEN_MIN_IMAGES={settings.golden_min_images}: too few to tell two models apart"
            )
        if store is not None:
            # never what training picks up; cached here, where the next ingest reads its patients
            publish(build.path, build.version, store, latest=False, cache_dir=settings.cache_dir())
        if pin:
            write_pin(settings.gitops_dir, described)
            sha = commit_pin(settings.gitops_dir, described) if commit else None
            if sha:
                console.print(_plain(f"committed the pin in {settings.gitops_dir}: {sha[:12]}"))
    _show_pin(described, pin_path(settings.gitops_dir) if pin else None)
    typer.echo(build.version)


@golden_app.command("show")
def golden_show() -> None:
    """Describe the pinned golden set (training/golden.yaml in CXR_GITOPS_DIR)."""
    from data_pipeline.golden import GoldenError, pin_path, read_pin

    settings = _settings()
    with _friendly_errors():
        pinned = read_pin(settings.gitops_dir)
        if pinned is None:
            raise GoldenError(
                f"no golden set pinned ({pin_path(settings.gitops_dir)} is missing): "
                "run `cxr data golden build`"
            )
    _show_pin(pinned, pin_path(settings.gitops_dir))


def _show_pin(pin: GoldenPin, path: Path | None) -> None:
    table = Table(title=_plain(f"golden set {pin.version}"))
    table.add_column("item")
    table.add_column("value", justify="right")
    table.add_row("images", str(pin.images))
    table.add_row("patients", str(pin.patients))
    table.add_row("no-finding images", str(pin.no_finding_images))
    for name, n in sorted(pin.findings.items()):
        table.add_row(_plain(f"boxes {name}"), str(n))
    table.add_row("pinned in", _plain(path) if path else "not pinned (--no-pin)")
    table.add_row("pinned at", _plain(pin.pinned_at))
    Console().print(table)


@app.command()
def buckets(
    extra: Annotated[
        list[str] | None, typer.Option("--bucket", help="more buckets besides CXR_S3_BUCKET (e.g. mlflow)")
    ] = None,
) -> None:
    """Create the object store's buckets if missing (idempotent): the cluster's and compose's first step."""
    from data_pipeline.store import ObjectStore

    settings = _settings()
    with _friendly_errors():
        for name in [settings.s3_bucket, *(extra or [])]:
            ObjectStore.from_env(settings.model_copy(update={"s3_bucket": name})).ensure_bucket()
            typer.echo(f"bucket {name} ready at {settings.s3_endpoint}")


@app.command()
def validate(
    annotations: Annotated[Path, typer.Option(help="VinDr-CXR CSV")],
    dicom_dir: Annotated[
        Path | None, typer.Option(help="check boxes against image sizes (headers only)")
    ] = None,
) -> None:
    """Check an annotation CSV (and optionally boxes against image sizes); exit 1 above the bad-row limit."""
    from data_pipeline.annotations import check_inside_images, load_annotations
    from data_pipeline.export import read_sizes

    settings = _settings()
    with _friendly_errors():
        if dicom_dir is not None and not dicom_dir.is_dir():
            what = "is not a folder" if dicom_dir.exists() else "does not exist"
            raise AnnotationError(f"image folder {dicom_dir} {what}")
        table = load_annotations(annotations)
        if not table.total_rows:
            # "ok" here would pass a file that labels no image: an export that wrote its header and
            # stopped, or the wrong file; ingest would then build a dataset of no annotated image
            raise AnnotationError(
                f"{annotations} has no annotation rows, only a header: export the readers' rows "
                "(one per box, or a 'No finding' row per image) and validate again"
            )
        if dicom_dir is not None:
            table = check_inside_images(table, read_sizes(dicom_dir, table.image_ids()))
        summary = Table(title=_plain(annotations))
        summary.add_column("item")
        summary.add_column("value", justify="right")
        summary.add_row("rows", str(table.total_rows))
        summary.add_row("images", str(len(table.image_ids())))
        summary.add_row("quarantined rows", str(len(table.quarantine)))
        Console().print(summary)
        if len(table.quarantine):
            bad = Table(title="quarantined rows (first 20)")
            bad.add_column("line", justify="right")
            bad.add_column("image_id")
            bad.add_column("reason")
            for row in table.quarantine.head(20).itertuples(index=False):
                bad.add_row(str(row.line), _plain(str(getattr(row, "image_id", ""))[:16]), _plain(row.reason))
            Console().print(bad)
        table.enforce(settings.max_bad_row_fraction)
    typer.echo("ok" if not len(table.quarantine) else f"ok with {len(table.quarantine)} quarantined rows")


@app.command()
def fetch(
    version: Annotated[str, typer.Argument(help="dataset version, or 'latest'")],
    cache_dir: Annotated[Path | None, typer.Option(help="default <stack>/datasets")] = None,
) -> None:
    """Download a dataset version from S3 into the local cache (verified) and print its path."""
    from data_pipeline.versioning import fetch_dataset

    settings = _settings()
    with _friendly_errors():
        path = fetch_dataset(version, cache_dir or settings.cache_dir())
    typer.echo(str(path))


@app.command()
def report(
    version: Annotated[str, typer.Argument(help="dataset version, 'latest', or a version folder")],
    out: Annotated[Path, typer.Option(help="folder for the PNGs, report.json and index.html")],
    annotations: Annotated[
        Path | None,
        typer.Option(help="readers' VinDr CSV, for a version built before it kept annotations_readers.csv"),
    ] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="default <stack>/datasets")] = None,
) -> None:
    """Draw a dataset version's report: class counts, box statistics, reader agreement, samples.

    Ingest already writes one into the version (report/, uploaded with it); this redraws it from a
    local folder or a version fetched from S3, e.g. for a version built before reports existed.
    """
    from data_pipeline.report import build_report, load_version
    from data_pipeline.versioning import fetch_dataset

    settings = _settings()
    with _friendly_errors():
        folder = Path(version)
        if not folder.is_dir():
            folder = fetch_dataset(version, cache_dir or settings.cache_dir())
        summary = build_report(load_version(folder, annotations), out, console=console)
    table = Table(title=_plain(f"dataset report {summary.version}"))
    table.add_column("item")
    table.add_column("value", justify="right")
    table.add_row("images", str(summary.images))
    table.add_row("fused finding boxes", str(summary.boxes))
    agreement = summary.reader_agreement
    table.add_row("reader agreement (mean IoU)", "n/a" if agreement is None else f"{agreement:.3f}")
    table.add_row("seconds", f"{summary.seconds:.1f}")
    Console().print(table)
    typer.echo(str(summary.index))
