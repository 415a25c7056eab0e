"""The package version, importable from every layer (the package root is the top-level facade)."""

__version__ = "0.1.0"
