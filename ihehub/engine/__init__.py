"""ihehub.engine"""
