"""ihehub.channels"""
