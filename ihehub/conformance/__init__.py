"""ihehub.conformance"""
