"""The I/O layer: MLflow tracking and registry, DVC and git versioning. The core (`cul.*`) never imports it."""
