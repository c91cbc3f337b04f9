"""The identification web service (FastAPI) over the reid library: enrol individuals, identify photos."""
