"""The container image that the launchers name by default; built from the repo's Dockerfile (docs/launch.md)."""

DEFAULT_IMAGE = "sct:0.1.0"
