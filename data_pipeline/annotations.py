"""Load and validate VinDr-CXR style annotation CSVs; quarantine bad rows with their line numbers.

Columns: ``image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max``. The
rules live in one pandera schema so they are declared, not scattered in if
statements, and every failure names the rule it broke. A bad row is never
silently dropped: it goes to the quarantine table (line number, reason, raw
values) that the quality report lists, and the run fails when too many rows
are bad (``CXR_MAX_BAD_ROW_FRACTION``), because then the file is wrong, not a
few rows.

The file comes from outside, and the quarantine ships inside the dataset version:
it keeps the VinDr columns only (an added ``patient_name`` column stays behind)
and clips every cell (:data:`MAX_CELL_CHARS`). A value no number can hold (``inf``,
``1e30`` as a class id) is a bad row like any other, never a crash.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pandera.pandas as pa

from data_pipeline.classes import ALL_LABELS, NO_FINDING_ID
from data_pipeline.errors import AnnotationError

log = logging.getLogger(__name__)

COLUMNS: tuple[str, ...] = (
    "image_id",
    "class_name",
    "class_id",
    "rad_id",
    "x_min",
    "y_min",
    "x_max",
    "y_max",
)
COORDS: list[str] = ["x_min", "y_min", "x_max", "y_max"]
#: Coordinates may overshoot the image by this many pixels (readers' tools round outward).
EDGE_TOLERANCE_PX = 2.0
#: A reader id: VinDr's R1..R17, the gateway's key ids ("radiologist-1"). Nothing a spreadsheet runs as a
#: formula (annotations_readers.csv is opened in one): no leading = + - @, no spaces, quotes or brackets.
#: a reader id: no control character, at most 128, and a first character no spreadsheet takes for a
#: formula (= + - @); the gateway writes its API key's id here, which may hold "@", "." or spaces
RAD_ID_PATTERN = r"[A-Za-z0-9_][^\x00-\x1f\x7f]{0,127}"
#: An image id (a file stem): no control character, and a first character no spreadsheet takes for a
#: formula. It goes as it is into the version's annotations_readers.csv and annotations_fused.csv, and a
#: file of that stem in the DICOM folder is all it takes to get there.
IMAGE_ID_PATTERN = r"[^=+\-@\x00-\x1f\x7f][^\x00-\x1f\x7f]*"
#: Longest cell value (and quoted value inside a reason) a quarantine row keeps: it ships in the version.
MAX_CELL_CHARS = 200
MAX_REASON_VALUE_CHARS = 40
_OUT_OF_RANGE = "class_id outside 0..14"


def clip(value: object, limit: int = MAX_CELL_CHARS) -> str:
    """``value`` as text, cut to ``limit`` characters (with a note of how much went)."""
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}...(+{len(text) - limit} chars)"


def _quoted(value: object) -> str:
    """A value from the file as a reason quotes it: short, repr'd."""
    return repr(clip(value, MAX_REASON_VALUE_CHARS))


def _name_matches_id(df: pd.DataFrame) -> pd.Series:
    expected = df["class_id"].map(ALL_LABELS)
    return expected.eq(df["class_name"].str.strip())


def _coords_ok(df: pd.DataFrame) -> pd.Series:
    finding = df["class_id"] != NO_FINDING_ID
    present = df[COORDS].notna().all(axis=1)
    ordered = (df["x_min"] < df["x_max"]) & (df["y_min"] < df["y_max"])
    non_negative = (df[COORDS] >= -EDGE_TOLERANCE_PX).all(axis=1)
    return ~finding | (present & ordered & non_negative)


def _no_finding_has_no_box(df: pd.DataFrame) -> pd.Series:
    return (df["class_id"] != NO_FINDING_ID) | df[COORDS].isna().all(axis=1)


def _image_id_ok(df: pd.DataFrame) -> pd.Series:
    return df["image_id"].str.fullmatch(IMAGE_ID_PATTERN).fillna(False).astype(bool)


def _rad_id_ok(df: pd.DataFrame) -> pd.Series:
    return df["rad_id"].str.fullmatch(RAD_ID_PATTERN).fillna(False).astype(bool)


SCHEMA = pa.DataFrameSchema(
    {
        "image_id": pa.Column(str, pa.Check.str_length(min_value=1), nullable=False),
        "class_name": pa.Column(str, nullable=False),
        "class_id": pa.Column("Int64", pa.Check.isin(list(ALL_LABELS)), nullable=False),
        "rad_id": pa.Column(str, nullable=False),
        **{c: pa.Column(float, nullable=True) for c in COORDS},
    },
    checks=[
        pa.Check(_name_matches_id, name="class_name_matches_id", error="class_name does not match class_id"),
        pa.Check(_coords_ok, name="box_present_and_ordered", error="finding needs x_min<x_max, y_min<y_max"),
        pa.Check(
            _no_finding_has_no_box, name="no_finding_without_box", error="'No finding' must have no box"
        ),
        pa.Check(
            _image_id_ok,
            name="image_id_format",
            error="image_id must not start with = + - @ (a spreadsheet formula) nor hold control characters",
        ),
        pa.Check(
            _rad_id_ok,
            name="rad_id_format",
            error="rad_id must be 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit",
        ),
    ],
    strict=False,
)


@dataclass
class AnnotationTable:
    """Valid rows (``frame``, with a ``line`` column) and quarantined ones (``quarantine``)."""

    frame: pd.DataFrame
    quarantine: pd.DataFrame
    total_rows: int
    source: str

    @property
    def bad_fraction(self) -> float:
        return len(self.quarantine) / self.total_rows if self.total_rows else 0.0

    def image_ids(self) -> list[str]:
        return sorted(self.frame["image_id"].unique().tolist())

    def enforce(self, max_bad_fraction: float) -> None:
        """Raise :class:`AnnotationError` when the quarantined share is above the limit."""
        if self.total_rows and self.bad_fraction > max_bad_fraction:
            sample = "; ".join(
                f"line {r.line}: {r.reason}" for r in self.quarantine.head(5).itertuples(index=False)
            )
            raise AnnotationError(
                f"{self.source}: {len(self.quarantine)} of {self.total_rows} rows are invalid "
                f"({self.bad_fraction:.1%} > limit {max_bad_fraction:.1%}). First problems: {sample}. "
                "Fix the file or raise CXR_MAX_BAD_ROW_FRACTION."
            )


def _empty_quarantine() -> pd.DataFrame:
    return pd.DataFrame({"line": pd.Series(dtype="int64"), "reason": pd.Series(dtype="str")})


#: Largest annotation CSV read. pandas holds every cell as a Python string, ~10x the file in memory:
#: VinDr-CXR's 15,000 images by 3 readers are ~5 MiB, so this leaves room for datasets 50x larger
#: while a wrong file (an image archive, a log) fails at once instead of exhausting the machine.
MAX_CSV_BYTES = 256 * 1024 * 1024


def read_csv(path: Path) -> pd.DataFrame:
    """Read the raw CSV as strings (typing happens in :func:`parse_frame` so errors keep their lines)."""
    try:
        size = path.stat().st_size
    except OSError:
        size = 0  # missing or unreadable: pandas says which, below
    if size > MAX_CSV_BYTES:
        raise AnnotationError(
            f"annotations file {path} is {size} bytes, over the {MAX_CSV_BYTES}-byte limit: "
            "is it the VinDr-CXR CSV? Split a larger one and ingest it in parts"
        )
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except FileNotFoundError as exc:
        raise AnnotationError(f"annotations file {path} not found") from exc
    except OSError as exc:  # a folder, or a file this user cannot read
        raise AnnotationError(f"annotations file {path} cannot be read ({exc.strerror})") from exc
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise AnnotationError(f"{path} is not a readable CSV: {exc}") from exc
    missing = [c for c in COLUMNS if c not in raw.columns]
    if missing:
        raise AnnotationError(
            f"{path} lacks columns {missing}; expected VinDr-CXR header {','.join(COLUMNS)}"
        )
    return raw


def parse_frame(raw: pd.DataFrame, source: str = "<frame>") -> AnnotationTable:
    """Type and validate a raw (all-string) frame; line numbers count the header as line 1."""
    # callers may hand over NaN/None for empty cells (pandas >= 3 keeps them missing through astype(str))
    raw = raw.reset_index(drop=True).fillna("")
    lines = np.arange(len(raw), dtype=np.int64) + 2
    df = pd.DataFrame(
        {
            "image_id": raw["image_id"].astype(str).str.strip(),
            "class_name": raw["class_name"].astype(str).str.strip(),
            "rad_id": raw["rad_id"].astype(str).str.strip(),
        }
    )
    reasons: dict[int, list[str]] = {}
    class_text = raw["class_id"].astype(str).str.strip()
    # float64 whatever the text: 1e30, inf or a 400-digit number must not reach the Int64 cast below
    class_num = pd.to_numeric(class_text, errors="coerce").astype("float64")
    integral = np.isfinite(class_num) & (class_num == np.floor(class_num))
    in_range = integral & class_num.between(0, NO_FINDING_ID)
    for i in np.flatnonzero(~integral.to_numpy()):
        reasons.setdefault(int(i), []).append(f"class_id {_quoted(class_text.iloc[i])} is not an integer")
    for i in np.flatnonzero((integral & ~in_range).to_numpy()):
        reasons.setdefault(int(i), []).append(_OUT_OF_RANGE)
    df["class_id"] = class_num.where(in_range, -1).astype("Int64")
    for col in COORDS:
        text = raw[col].astype(str).str.strip()
        values = pd.to_numeric(text, errors="coerce").astype("float64")
        unparsable = values.isna() & text.ne("") & text.str.lower().ne("nan")
        for i in np.flatnonzero(unparsable.to_numpy()):
            reasons.setdefault(int(i), []).append(f"{col} {_quoted(text.iloc[i])} is not a number")
        for i in np.flatnonzero(np.isinf(values.to_numpy())):
            reasons.setdefault(int(i), []).append(f"{col} {_quoted(text.iloc[i])} is not a finite number")
        df[col] = values
    df.loc[df["rad_id"].eq(""), "rad_id"] = "unknown"

    try:
        SCHEMA.validate(df, lazy=True)
    except pa.errors.SchemaErrors as exc:
        cases = exc.failure_cases
        cases = cases[cases["index"].notna()]
        for idx, check in zip(cases["index"].astype(int), cases["check"].astype(str), strict=True):
            text = _describe(check)
            bucket = reasons.setdefault(int(idx), [])
            if text not in bucket:
                bucket.append(text)

    bad = np.zeros(len(df), dtype=bool)
    if reasons:
        bad[list(reasons)] = True
    quarantine = _quarantine_rows(
        raw.loc[bad], lines[bad], ["; ".join(reasons[int(i)]) for i in np.flatnonzero(bad)]
    )
    good = df.loc[~bad].copy()
    good["class_id"] = good["class_id"].astype(int)
    good.insert(0, "line", lines[~bad])
    table = AnnotationTable(
        frame=good.reset_index(drop=True),
        quarantine=quarantine.reset_index(drop=True) if len(quarantine) else _empty_quarantine(),
        total_rows=len(df),
        source=source,
    )
    log.info("event=annotations_parsed source=%s rows=%d quarantined=%d", source, len(df), len(quarantine))
    return table


def _quarantine_rows(rows: pd.DataFrame, lines: np.ndarray, reasons: list[str]) -> pd.DataFrame:
    """Quarantine table: line, reason, then the VinDr columns only, every text clipped.

    It ships inside the version (quality_report.json): a column the file added (a patient's name)
    or a megabyte cell must not travel with it.
    """
    out = pd.DataFrame(
        {"line": np.asarray(lines, dtype=np.int64), "reason": [clip(r, 4 * MAX_CELL_CHARS) for r in reasons]}
    )
    for col in COLUMNS:
        values = rows[col].tolist()
        out[col] = [clip(v) if isinstance(v, str) else v for v in values]
    return out


def _describe(check: str) -> str:
    for c in SCHEMA.checks:
        if c.name == check:
            return str(c.error)
    if check.startswith("isin"):
        return _OUT_OF_RANGE
    if "str_length" in check:
        return "image_id is empty"
    return check


def load_annotations(path: Path) -> AnnotationTable:
    """Read + validate a VinDr CSV file."""
    return parse_frame(read_csv(Path(path)), source=str(path))


def check_inside_images(table: AnnotationTable, sizes: Mapping[str, tuple[int, int]]) -> AnnotationTable:
    """Quarantine boxes outside their image and rows of unknown images (``sizes``: id -> (w, h)).

    Called once the images are decoded, since the CSV alone does not know sizes.
    """
    df = table.frame
    width = df["image_id"].map(lambda i: sizes.get(i, (np.nan, np.nan))[0]).astype(float)
    height = df["image_id"].map(lambda i: sizes.get(i, (np.nan, np.nan))[1]).astype(float)
    unknown = width.isna()
    is_box = df["class_id"] != NO_FINDING_ID
    outside = (
        is_box
        & ~unknown
        & ((df["x_max"] > width + EDGE_TOLERANCE_PX) | (df["y_max"] > height + EDGE_TOLERANCE_PX))
    )
    bad = (unknown | outside).to_numpy()
    if not bad.any():
        return table
    reasons = np.where(unknown.to_numpy(), "image not found or not decodable", "box outside the image")
    moved = _quarantine_rows(df.loc[bad], df.loc[bad, "line"].to_numpy(), reasons[bad].tolist())
    quarantine = pd.concat([table.quarantine, moved], ignore_index=True).sort_values("line", kind="stable")
    return AnnotationTable(
        frame=df.loc[~bad].reset_index(drop=True),
        quarantine=quarantine.reset_index(drop=True),
        total_rows=table.total_rows,
        source=table.source,
    )


def merge_tables(
    base: AnnotationTable, extra: AnnotationTable, *, replace_images: bool = True
) -> AnnotationTable:
    """Add ``extra`` rows (feedback) to ``base``; images present in both take ``extra``'s rows.

    A radiologist's correction through the review page is a complete reading
    of that image, so it replaces the original readers' boxes rather than
    being fused with them.
    """
    frame = base.frame
    if replace_images and len(extra.frame):
        frame = frame[~frame["image_id"].isin(set(extra.frame["image_id"]))]
    return AnnotationTable(
        frame=pd.concat([frame, extra.frame], ignore_index=True),
        quarantine=pd.concat([base.quarantine, extra.quarantine], ignore_index=True),
        total_rows=base.total_rows + extra.total_rows,
        source=f"{base.source}+{extra.source}",
    )


def combine_tables(tables: list[AnnotationTable], source: str) -> AnnotationTable:
    """One table of several checked ones (feedback items), rows kept as they are (no replacing)."""
    frames = [t.frame for t in tables if len(t.frame)]
    quarantines = [t.quarantine for t in tables if len(t.quarantine)]
    return AnnotationTable(
        frame=pd.concat(frames, ignore_index=True) if frames else parse_frame(_no_rows()).frame,
        quarantine=pd.concat(quarantines, ignore_index=True) if quarantines else _empty_quarantine(),
        total_rows=sum(t.total_rows for t in tables),
        source=source,
    )


def _no_rows() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="str") for c in COLUMNS})
