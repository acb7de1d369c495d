"""ihehub.xds"""
