"""The package version, defined once (read statically by setuptools: pyproject.toml)."""
__version__ = "0.1.0"
