"""ihehub.dicom"""
