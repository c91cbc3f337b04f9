"""API-key checks as dependencies: writes need the key when one is set, reads only with ``protect_reads``.

The key travels in ``X-API-Key`` and is compared with :func:`hmac.compare_digest`, so the time a wrong key takes
says nothing about how much of it was right.
"""

from __future__ import annotations

import hmac

from fastapi import Security
from fastapi.security import APIKeyHeader

from service.deps import SettingsDep
from service.errors import UnauthorizedError
from service.settings import Settings

API_KEY_HEADER = "X-API-Key"
_api_key = APIKeyHeader(name=API_KEY_HEADER, auto_error=False,
                        description="the service's API key (writes always need it when one is set; reads only with "
                                    "--protect-reads)")


def _check(settings: Settings, given: str | None) -> None:
    if settings.api_key is None:
        return
    if given is None:
        raise UnauthorizedError(f"this request needs the API key in the {API_KEY_HEADER} header", API_KEY_HEADER)
    if not hmac.compare_digest(given.encode(), settings.api_key.get_secret_value().encode()):
        raise UnauthorizedError(f"the API key in the {API_KEY_HEADER} header is wrong", API_KEY_HEADER)


# async: they never block, and a plain ``def`` dependency would cost every request a hop through the thread pool
async def require_key_for_writes(settings: SettingsDep, api_key: str | None = Security(_api_key)) -> None:
    _check(settings, api_key)


async def require_key_for_reads(settings: SettingsDep, api_key: str | None = Security(_api_key)) -> None:
    if settings.protect_reads:
        _check(settings, api_key)
