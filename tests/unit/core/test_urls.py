"""core.urls: a server address is never shown with the password in it, valid or not."""

from __future__ import annotations

import pytest

from core.urls import AddressError, http_url, redacted

pytestmark = pytest.mark.unit

SECRET = "s3cret"


@pytest.mark.parametrize(
    "value",
    [
        f"http://user:{SECRET}@[::1",  # no closing bracket
        f"http://user:{SECRET}@host:99999/",  # port out of range
        f"ftp://user:{SECRET}@host/",  # wrong scheme
        f"user:{SECRET}@host:8080",  # no scheme
        f"http://user:{SECRET}@/path",  # no host
        f"http://user:{SECRET[:3]}/{SECRET[3:]}@host",  # a "/" in the password: urllib cuts a "port" from it
    ],
)
def test_a_refused_address_is_named_without_its_password(value: str) -> None:
    with pytest.raises(AddressError, match="CXR_X_URL") as refused:
        http_url(value, "CXR_X_URL", "http://127.0.0.1:1")
    message = str(refused.value)
    assert SECRET not in message and SECRET[:3] not in message.replace("***", ""), message


def test_a_refused_address_without_credentials_is_shown_as_typed_with_urllibs_reason() -> None:
    with pytest.raises(AddressError, match=r"'http://\[::1' .*\(Invalid IPv6 URL\)"):
        http_url("http://[::1", "CXR_X_URL", "http://127.0.0.1:1")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://user:pw@host:80/x?y#z", "http://host:80/x?y#z"),
        ("http://host/x", "http://host/x"),
        (f"http://user:{SECRET}@[::1", "http://***@[::1"),  # urlsplit refuses it: no ValueError here
        (f"user:{SECRET}@host:8080", "***@host:8080"),  # urllib reads "user" as the scheme
        # a "/", "?" or "#" in the password: urllib ends the host there, the password was shown whole
        (f"http://user:{SECRET[:3]}/{SECRET[3:]}@pacs:8042/dicom-web", "http://***@pacs:8042/dicom-web"),
        (f"https://user:12/{SECRET}@pacs/dicom-web", "https://***@pacs/dicom-web"),
        (f"http://user:{SECRET[:3]}?{SECRET[3:]}@pacs/x", "http://***@pacs/x"),
        (f"http://user:{SECRET[:3]}#{SECRET[3:]}@pacs/x", "http://***@pacs/x"),
    ],
)
def test_redacted_drops_the_credentials_of_any_value_and_never_raises(url: str, shown: str) -> None:
    assert redacted(url) == shown
