"""Tests of the channel connectors."""
