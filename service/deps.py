"""The dependencies every route asks for, as ``Annotated`` types (FastAPI's full-stack template does the same): a
route declares ``engine: EngineDep`` and gets the engine the app opened at start-up.

They are ``async`` because they only read ``app.state``: FastAPI runs a plain ``def`` dependency in its thread pool,
a hop per dependency and request for nothing (BENCHMARKS.md, identify overhead)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.engine import Engine
from service.settings import Settings


async def get_engine(request: Request) -> Engine:
    return request.app.state.engine


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


EngineDep = Annotated[Engine, Depends(get_engine)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
