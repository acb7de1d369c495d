"""Tests of the framework-free HL7 v2 helpers (ihehub.hl7)."""
