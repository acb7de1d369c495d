"""DICOM image manager: Verification, Storage and C-FIND SCP on one AE, files on disk, a SQL index.

The public API; see ``docs/dicom.md``.
"""

from ihehub.dicom.indexer import Indexer, StudyComplete
from ihehub.dicom.server import ImageManager, StudyCompleteHandler
from ihehub.dicom.settings import SETTINGS_SCHEMA, DicomNode, DicomSettings, InvalidSettings
from ihehub.dicom.storage import InstanceStore, StoredInstance, StoreFailure

__all__ = [
    "SETTINGS_SCHEMA",
    "DicomNode",
    "DicomSettings",
    "ImageManager",
    "Indexer",
    "InstanceStore",
    "InvalidSettings",
    "StoreFailure",
    "StoredInstance",
    "StudyComplete",
    "StudyCompleteHandler",
]
