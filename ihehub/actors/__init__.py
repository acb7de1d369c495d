"""ihehub.actors"""
