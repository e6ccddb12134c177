"""The HTTP edge: routes, auth, validation, SSE and the one error envelope."""
