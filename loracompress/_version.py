"""The package version, in a leaf module: everything that records it (reports, cards, exported metadata)
imports it from here, never from the package root, so no import order matters. pyproject.toml reads it too."""

__version__ = "0.1.0"
