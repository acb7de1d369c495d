"""ihehub.bus"""
