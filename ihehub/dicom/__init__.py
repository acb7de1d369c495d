"""DICOM image manager: Verification, Storage, C-FIND, C-MOVE, C-GET and Modality Worklist SCP on one AE,
files on disk, a SQL index; a Storage SCU that forwards the files as stored.

The public API; see ``docs/dicom.md``.
"""

from ihehub.dicom.indexer import Indexer, StudyComplete
from ihehub.dicom.retrieve import Retriever
from ihehub.dicom.scu import AssociationFailed, SendResult, StorageSCU
from ihehub.dicom.server import ImageManager, StudyCompleteHandler
from ihehub.dicom.settings import SETTINGS_SCHEMA, DicomNode, DicomSettings, InvalidSettings
from ihehub.dicom.storage import InstanceStore, StoredInstance, StoreFailure
from ihehub.dicom.worklist import ScheduledStep

__all__ = [
    "SETTINGS_SCHEMA",
    "AssociationFailed",
    "DicomNode",
    "DicomSettings",
    "ImageManager",
    "Indexer",
    "InstanceStore",
    "InvalidSettings",
    "Retriever",
    "ScheduledStep",
    "SendResult",
    "StorageSCU",
    "StoreFailure",
    "StoredInstance",
    "StudyComplete",
    "StudyCompleteHandler",
]
