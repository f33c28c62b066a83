"""Prefect flows: thin wiring of the `cul` library's stages (built in issue 4)."""
