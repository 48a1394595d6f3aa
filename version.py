"""The pack's version, in one place (read by pyproject tooling, manifests and the CLI)."""
__version__ = "0.1.0"
