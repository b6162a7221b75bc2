"""The single source of the package version (read by setup.py and at run time)."""

__version__ = "0.1.0"
