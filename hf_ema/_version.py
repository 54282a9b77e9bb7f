"""The package version, in a module that imports nothing, so that any layer can read it without importing the
package face (`hf_ema/__init__.py`) back."""

__version__ = "0.1.0"
