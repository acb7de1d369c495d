"""ihehub.empi"""
