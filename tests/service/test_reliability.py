"""The service under stress: many clients at once, ``kill -9`` in the middle of enrolments, and generated requests
from its own OpenAPI schema. Short versions of ``bench/service_reliability.py``, sized for a 2-core machine."""

from __future__ import annotations

import traceback
from pathlib import Path

import pandas as pd
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Err
from schemathesis.specs.openapi.checks import response_schema_conformance

from service.app import create_app
from service.settings import Settings
from tests.service.conftest import API_KEY, StartServer
from tests.service.helpers import enroll, photos
from tests.service.reliability import KINDS, crash_rounds, index_equals_store, run_load

#: The load and kill tests start real servers (10-15 s a start on a 2-core machine, most of it importing torch).
pytestmark = pytest.mark.slow


def test_mixed_load_has_no_error_and_no_miss(start_server: StartServer, tmp_path: Path, checkpoint_a: Path,
                                             records: pd.DataFrame) -> None:
    data_dir = tmp_path / "data"
    server = start_server(checkpoint_a, data_dir, "--api-key", API_KEY)
    report = run_load(server.url, API_KEY, records, clients=8, seconds=8, seed=0)

    assert not report.server_errors, report.server_errors[:5]
    assert not report.connection_errors, report.connection_errors[:5]
    assert not report.unexpected, report.unexpected[:5]
    assert not report.misses, report.misses[:5]
    assert all(report.requests[kind] > 0 for kind in KINDS), report.requests
    assert report.checked_identifies > 0, "no identify was of a photo that had to be found"
    counts = index_equals_store(server.url, API_KEY, data_dir)
    assert counts.agree, counts


def test_kill_9_rounds_lose_nothing(start_server: StartServer, tmp_path: Path, checkpoint_a: Path,
                                    records: pd.DataFrame) -> None:
    report = crash_rounds(lambda checkpoint, data_dir: start_server(checkpoint, data_dir, "--api-key", API_KEY),
                          checkpoint_a, tmp_path / "data", records, rounds=3, seed=0, api_key=API_KEY)
    assert not report.problems(), report.problems()[:10]
    assert report.acknowledged > 0, "no enrolment was acknowledged before a kill: the rounds tested nothing"


#: Requests generated per operation and generation mode (valid, invalid): 2 x 15 x 13 operations, ~15 s.
FUZZ_EXAMPLES = 15


@pytest.fixture
def fuzzed_app_schema(tmp_path: Path, checkpoint_a: Path, records: pd.DataFrame) -> schemathesis.BaseSchema:
    """The app's own OpenAPI schema, served in-process (schemathesis runs the app's lifespan, and its pytest plugin
    ends it at teardown), over a store holding two individuals so that listings, photos and the RSM have something
    to show."""
    app_settings = Settings(checkpoint=checkpoint_a, data_dir=tmp_path / "data", api_key=API_KEY)
    with TestClient(create_app(app_settings), headers={"X-API-Key": API_KEY}) as client:
        for name, identity in (("fuzz-a", "ind_000"), ("fuzz-b", "ind_001")):
            assert enroll(client, name, photos(records, identity)[:2]).status_code == 201
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(app_settings))


def test_generated_requests_get_no_server_error(fuzzed_app_schema: schemathesis.BaseSchema) -> None:
    """Valid and invalid requests generated from the schema for every operation, with the right API key (so that
    writes get past the key check): whatever they hold, the answer is never a 5xx, and its body is what the schema
    says (an ErrorBody for every refusal).

    Hypothesis drives each operation's strategy directly: schemathesis' own pytest integration for a schema made by
    a fixture (``schemathesis.pytest.from_fixture``) fails on pytest 9 (it reads ``request.node._nodeid``).
    """
    failures = []
    for result in fuzzed_app_schema.get_all_operations():
        if isinstance(result, Err):
            raise result.err()
        operation = result.ok()
        for mode in GenerationMode:

            @given(operation.as_strategy(generation_mode=mode))
            @settings(max_examples=FUZZ_EXAMPLES, derandomize=True, database=None, deadline=None,
                      suppress_health_check=list(HealthCheck))
            def call(case: schemathesis.Case) -> None:
                case.call_and_validate(headers={"X-API-Key": API_KEY},
                                       checks=[not_a_server_error, response_schema_conformance])

            try:
                call()
            except Exception as error:  # noqa: BLE001 - every operation is fuzzed, then all failures are shown
                # the last frames (the app's, for an exception it raised) and the notes: the falsifying example and
                # a curl command that reproduces it
                failures.append(f"{operation.label} ({mode.value}):\n"
                                + "".join(traceback.format_exception(error, limit=-4)))
    assert not failures, "\n\n".join(failures)
