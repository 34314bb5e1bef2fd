"""The package version (one place: fastavts/__init__.py and setup.py read it)."""
__version__ = "0.1.0"
