"""ihehub.film"""
