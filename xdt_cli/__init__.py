"""xdt: one command line for cross-domain knowledge transfer experiments."""

__version__ = "0.1.0"
