"""The package version, in a module that imports nothing (the store stamps it on every run)."""

__version__ = "0.1.0"
