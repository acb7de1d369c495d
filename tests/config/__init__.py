"""Tests of ihehub.config: home folder, YAML + JSON Schema validation with file:line."""
