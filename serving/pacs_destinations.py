"""Where results are sent back to: a PACS reached by DICOMweb STOW-RS or by DIMSE C-STORE.

Destinations are settings (``CXR_PACS_DESTINATIONS``, a JSON list), validated at
start-up like every other knob, so a typo fails the launch and not a delivery.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, Field, model_validator

_AE = re.compile(r"^[ -~]{1,16}$")  # PS3.5 AE: 16 characters of the default repertoire, no backslash


class PacsDestination(BaseModel):
    """One PACS that receives our SR, presentation states and (optionally) burned-in captures.

    ``kind: stow`` needs ``url`` (the DICOMweb root, e.g. ``http://pacs:8042/dicom-web``) and may carry
    ``headers`` (e.g. ``{"Authorization": "Basic ..."}``); ``kind: dimse`` needs ``ae_title``, ``host``
    and ``port`` (we call as ``calling_ae``). ``callers``: the tenants whose results may go to this
    PACS (``*`` for every caller): the SR and presentation states carry the patient's identity, so a
    request never sends them to a PACS of another tenant, not even when it asks (``send_back=true``).
    ``auto`` (default true): their STOW-RS uploads are sent back here without asking; false: only
    when the request asks with ``send_back=true``.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    kind: Literal["stow", "dimse"]
    url: str = ""
    headers: dict[str, str] = Field(default_factory=dict)
    ae_title: str = ""
    host: str = ""
    port: int = Field(default=0, ge=0, le=65535)
    calling_ae: str = "CXR"
    callers: list[str] = Field(default_factory=list)
    auto: bool = True
    timeout_s: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _complete(self) -> PacsDestination:
        if self.kind == "stow" and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"destination '{self.name}': kind stow needs an http(s) url, got '{self.url}'")
        if self.kind == "dimse":
            if not (self.ae_title and self.host and self.port):
                raise ValueError(f"destination '{self.name}': kind dimse needs ae_title, host and port")
            for ae in (self.ae_title, self.calling_ae):
                if not _AE.match(ae) or "\\" in ae:
                    raise ValueError(f"destination '{self.name}': '{ae}' is not a valid AE title")
        if not [c for c in self.callers if c.strip()]:
            # an empty list once meant "only when a request asks"; now it would mean "never", silently
            raise ValueError(
                f"destination '{self.name}': callers is empty, so no tenant's results would ever go there; "
                'list the tenants (API keys\' tenants) whose PACS it is (["*"] only where every '
                'tenant\'s results may go there); add "auto": false to send only when a request asks'
            )
        return self

    def serves(self, tenant: str) -> bool:
        """Whether results of ``tenant`` may be sent back here (asked for, or ``auto``)."""
        return "*" in self.callers or tenant in self.callers
