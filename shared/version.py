"""The project's name and version, written here once: pyproject.toml reads the version from this file
(`[tool.setuptools.dynamic]`), so the installed package's metadata is this by construction, and every place that
reports it reads it here: `akd --version`, the service's `akd_build_info` metric and its OpenAPI `info.version`."""

NAME = "akd"
VERSION = "0.1.0"
