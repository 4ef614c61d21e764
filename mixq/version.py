"""The package version (read statically by setuptools; imported by the package and engine files)."""
__version__ = "0.1.0"
