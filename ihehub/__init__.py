"""ihehub — an integration engine for hospital imaging."""

__version__ = "0.1.0"
