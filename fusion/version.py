"""The version of fusion, in one place (the package, plugins and outputs all report it)."""

__version__ = "0.1.0"
