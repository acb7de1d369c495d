"""Migration revisions: 0001 is the bus; each domain branches from it."""
