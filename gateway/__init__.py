"""The gateway service: API, pipeline, backends, admission, persistence, telemetry, CLI."""
