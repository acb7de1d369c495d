"""ihehub.mappings"""
