"""Coded values of DICOM PS3.16 (code system "DCM"), RFC 3881 and the IHE Technical Frameworks
used in audit messages.

Every coded element of DICOM PS3.15 Annex A.5.1 (EventID, EventTypeCode, RoleIDCode,
ParticipantObjectIDTypeCode, ...) is a `Code` with ``csd-code``, ``codeSystemName`` and
``originalText`` (the XSD requires all three); ``displayName`` is optional.
"""

from __future__ import annotations

import dataclasses

__all__ = [
    "DCM",
    "IHE_TX",
    "RFC3881",
    "Code",
    "ihe_transaction",
]

DCM = "DCM"
RFC3881 = "RFC-3881"
IHE_TX = "IHE Transactions"


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Code:
    """A coded value (DICOM PS3.15 A.5.1 "CodedValueType": csd-code, codeSystemName, originalText)."""

    code: str
    system: str = ""
    text: str = ""
    display: str | None = None


def ihe_transaction(code: str, text: str) -> Code:
    """An EventTypeCode / ParticipantObjectIDTypeCode of the "IHE Transactions" code system."""
    return Code(code=code, system=IHE_TX, text=text)


def _dcm(code: str, text: str) -> Code:
    return Code(code=code, system=DCM, text=text)


# -- EventID (DICOM PS3.16 CID 400 "Audit Event ID") ----------------------------------------------
APPLICATION_ACTIVITY = _dcm("110100", "Application Activity")
AUDIT_LOG_USED = _dcm("110101", "Audit Log Used")
BEGIN_TRANSFERRING = _dcm("110102", "Begin Transferring DICOM Instances")
DICOM_INSTANCES_ACCESSED = _dcm("110103", "DICOM Instances Accessed")
DICOM_INSTANCES_TRANSFERRED = _dcm("110104", "DICOM Instances Transferred")
DICOM_STUDY_DELETED = _dcm("110105", "DICOM Study Deleted")
EXPORT = _dcm("110106", "Export")
IMPORT = _dcm("110107", "Import")
NETWORK_ENTRY = _dcm("110108", "Network Entry")
ORDER_RECORD = _dcm("110109", "Order Record")
PATIENT_RECORD = _dcm("110110", "Patient Record")
PROCEDURE_RECORD = _dcm("110111", "Procedure Record")
QUERY = _dcm("110112", "Query")
SECURITY_ALERT = _dcm("110113", "Security Alert")
USER_AUTHENTICATION = _dcm("110114", "User Authentication")

# -- EventTypeCode (CID 401 application activity, CID 403 security alert, CID 404 authentication) --
APPLICATION_START = _dcm("110120", "Application Start")
APPLICATION_STOP = _dcm("110121", "Application Stop")
LOGIN = _dcm("110122", "Login")
LOGOUT = _dcm("110123", "Logout")
SECURITY_ALERT_TYPES: dict[str, Code] = {
    "node-authentication": _dcm("110126", "Node Authentication"),
    "emergency-override-started": _dcm("110127", "Emergency Override Started"),
    "network-configuration": _dcm("110128", "Network Configuration"),
    "security-configuration": _dcm("110129", "Security Configuration"),
    "hardware-configuration": _dcm("110130", "Hardware Configuration"),
    "software-configuration": _dcm("110131", "Software Configuration"),
    "use-of-restricted-function": _dcm("110132", "Use of Restricted Function"),
    "audit-recording-stopped": _dcm("110133", "Audit Recording Stopped"),
    "audit-recording-started": _dcm("110134", "Audit Recording Started"),
    "object-security-attributes-changed": _dcm("110135", "Object Security Attributes Changed"),
    "security-roles-changed": _dcm("110136", "Security Roles Changed"),
    "user-security-attributes-changed": _dcm("110137", "User security Attributes Changed"),
    "emergency-override-stopped": _dcm("110138", "Emergency Override Stopped"),
    "remote-service-operation-started": _dcm("110139", "Remote Service Operation Started"),
    "remote-service-operation-stopped": _dcm("110140", "Remote Service Operation Stopped"),
    "local-service-operation-started": _dcm("110141", "Local Service Operation Started"),
    "local-service-operation-stopped": _dcm("110142", "Local Service Operation Stopped"),
}

# -- RoleIDCode (CID 402 "Audit Active Participant Role ID Code") ----------------------------------
APPLICATION = _dcm("110150", "Application")
APPLICATION_LAUNCHER = _dcm("110151", "Application Launcher")
DESTINATION = _dcm("110152", "Destination Role ID")
SOURCE = _dcm("110153", "Source Role ID")
DESTINATION_MEDIA = _dcm("110154", "Destination Media")
SOURCE_MEDIA = _dcm("110155", "Source Media")

# -- ParticipantObjectIDTypeCode --------------------------------------------------------------------
PATIENT_NUMBER = Code(code="2", system=RFC3881, text="Patient Number")
REPORT_NUMBER = Code(code="9", system=RFC3881, text="Report Number")
URI = Code(code="12", system=RFC3881, text="URI")
STUDY_INSTANCE_UID = _dcm("110180", "Study Instance UID")
SOP_CLASS_UID = _dcm("110181", "SOP Class UID")
NODE_ID = _dcm("110182", "Node ID")
SUBMISSION_SET = Code(
    code="urn:uuid:a54d6aa5-d40d-43f9-88c5-b4633d873bdd",
    system="IHE XDS Metadata",
    text="submission set classificationNode",
)

# -- AuditSourceTypeCode (PS3.15 A.5.1, RFC 3881 5.4) -----------------------------------------------
SOURCE_TYPES: dict[int, str] = {
    1: "End-user display device, diagnostic device",
    2: "Data acquisition device or instrument",
    3: "Web Server process or thread",
    4: "Application Server process or thread",
    5: "Database Server process or thread",
    6: "Security server, e.g., a domain controller",
    7: "ISO level 1-3 network component",
    8: "ISO level 4-6 operating software",
    9: "Other",
}


def source_type(code: int) -> Code:
    """An AuditSourceTypeCode (1..9) with its RFC 3881 text."""
    return _dcm(str(code), SOURCE_TYPES.get(code, "Other"))
