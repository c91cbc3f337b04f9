"""HTTP routes, one module per resource; each documents the error responses a client can get."""
