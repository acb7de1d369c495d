"""ihehub.atna"""
