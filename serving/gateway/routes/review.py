"""``GET /``: the radiologists' review page (static HTML + JS; the data routes need a key)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

router = APIRouter(tags=["review"])
STATIC_DIR = Path(__file__).resolve().parent.parent / "static"


@router.get("/", include_in_schema=False)
async def review_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")
