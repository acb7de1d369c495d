"""ihehub test suite (a package, so test helpers import as tests.<dir>.<module>)."""
