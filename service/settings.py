"""Service settings: command-line flags and ``REID_*`` environment variables, validated in one place.

pydantic-settings reads ``REID_CHECKPOINT``, ``REID_DATA_DIR``, ``REID_API_KEY``... so the same service starts
from a shell, a container or a test with no config file; explicit arguments (the CLI flags) win over the
environment.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from reid.gallery import IndexKind
from reid.onnx_backend import Backend
from reid.imageio import DEFAULT_MAX_PIXELS
from reid.metrics import THRESHOLD_RANGE

#: Upper bound of ``k`` for identify: a ranking longer than this is never useful to a person and only costs time.
MAX_K = 50


class Settings(BaseSettings):
    """Everything the service needs to start; see docs/service.md for the table of environment variables."""

    model_config = SettingsConfigDict(env_prefix="REID_", extra="forbid")

    checkpoint: Path = Field(description="checkpoint whose encoder embeds every photo")
    data_dir: Path = Field(description="folder the service owns: the SQLite database and the enrolled photos")
    host: str = Field("127.0.0.1", description="interface to listen on (127.0.0.1: this machine only; 0.0.0.0: every "
                                               "network this machine is on)")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    api_key: SecretStr | None = Field(None, description="key clients send in X-API-Key for writes; unset leaves "
                                                        "writes open. Prefer REID_API_KEY, which other users cannot "
                                                        "see in the process list")
    protect_reads: bool = Field(False, description="require the API key for every API read too (identify, listings, "
                                                   "photos, /health, /rsm.png)")
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1, description="largest request body accepted (413 above)")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="largest decoded image (decompression-bomb guard)")
    index: IndexKind = Field("flat", description="FAISS index: flat (exact), ivf (approximate, for galleries of "
                                                  "~100k photos and more) or hnsw (approximate)")
    backend: Backend = Field("torch", description="how the encoder runs: torch, or onnx (ONNX Runtime on the CPU: the "
                                                  "same embeddings, faster there)")
    default_k: int = Field(5, ge=1, le=MAX_K, description="individuals returned by identify when k is not given")
    verify: bool | None = Field(
        None, description="verify identify's top candidates with local features; unset: when the checkpoint was "
                          "calibrated for it (reid calibrate --verify); true with a checkpoint that was not refuses "
                          "to start",
    )
    default_threshold: float | None = Field(
        None, ge=THRESHOLD_RANGE[0], le=THRESHOLD_RANGE[1], allow_inf_nan=False,
        description="new_turtle threshold when neither the request nor the checkpoint gives one; "
                    "unset, an uncalibrated model never reports new_turtle",
    )

    @model_validator(mode="after")
    def _reads_protected_by_a_key(self) -> Settings:
        """`protect_reads` with no key to protect them would start a server that protects nothing; an empty key (an
        unset ``${REID_API_KEY}`` in an env file) would lock every write behind a key no client can send."""
        if self.api_key is not None and not self.api_key.get_secret_value().strip():
            raise ValueError("api_key (--api-key or REID_API_KEY) is empty: set a key, or leave it unset to leave "
                             "writes open")
        if self.protect_reads and self.api_key is None:
            raise ValueError("protect_reads needs api_key (REID_API_KEY): without a key nothing can be protected")
        return self
