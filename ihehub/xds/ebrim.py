"""ebRIM 3.0 metadata of XDS.b: constants, safe XML parsing, submissions, slot helpers.

The UUIDs are those of ITI TF-3 4.2.5 ("Metadata Identifiers", Rev. 19.0) and the associations of
ITI TF-3 4.2.2 (Table 4.2.2-1); attribute names follow ITI TF-3 4.2.3 (Table 4.2.3.2-1 DocumentEntry,
4.2.3.3-1 SubmissionSet, 4.2.3.4-1 Folder).  A submission is an ``lcm:SubmitObjectsRequest`` holding a
``rim:RegistryObjectList`` (ITI TF-2b 3.42.4.1.2).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from lxml import etree

from ihehub.xds.errors import FAILURE as FAILURE
from ihehub.xds.errors import PARTIAL_SUCCESS as PARTIAL_SUCCESS
from ihehub.xds.errors import REGISTRY_METADATA_ERROR, XdsError, XdsFailure, XdsParseError
from ihehub.xds.errors import SUCCESS as SUCCESS

NS = {
    "rim": "urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0",
    "rs": "urn:oasis:names:tc:ebxml-regrep:xsd:rs:3.0",
    "lcm": "urn:oasis:names:tc:ebxml-regrep:xsd:lcm:3.0",
    "query": "urn:oasis:names:tc:ebxml-regrep:xsd:query:3.0",
    "xds": "urn:ihe:iti:xds-b:2007",
    "xop": "http://www.w3.org/2004/08/xop/include",
}
RIM = "{" + NS["rim"] + "}"
LCM = "{" + NS["lcm"] + "}"

# availabilityStatus (ITI TF-3 4.2.3.2.2, 4.1.4)
APPROVED = "urn:oasis:names:tc:ebxml-regrep:StatusType:Approved"
DEPRECATED = "urn:oasis:names:tc:ebxml-regrep:StatusType:Deprecated"
SUBMITTED = "urn:oasis:names:tc:ebxml-regrep:StatusType:Submitted"

# ebRIM object types (ebRIM 3.0 canonical ObjectType ClassificationScheme)
OT_CLASSIFICATION = "urn:oasis:names:tc:ebxml-regrep:ObjectType:RegistryObject:Classification"
OT_ASSOCIATION = "urn:oasis:names:tc:ebxml-regrep:ObjectType:RegistryObject:Association"
OT_REGISTRY_PACKAGE = "urn:oasis:names:tc:ebxml-regrep:ObjectType:RegistryObject:RegistryPackage"
OT_EXTERNAL_IDENTIFIER = "urn:oasis:names:tc:ebxml-regrep:ObjectType:RegistryObject:ExternalIdentifier"

# DocumentEntry (ITI TF-3 4.2.5.1 / Table 4.2.5.1-1)
DE_OBJECT_TYPE_STABLE = "urn:uuid:7edca82f-054d-47f2-a032-9b2a5b5186c1"
DE_OBJECT_TYPE_ON_DEMAND = "urn:uuid:34268e47-fdf5-41a6-ba33-82133c465248"
DE_AUTHOR = "urn:uuid:93606bcf-9494-43ec-9b4e-a7748d1a838d"
DE_CLASS_CODE = "urn:uuid:41a5887f-8865-4c09-adf7-e362475b143a"
DE_CONFIDENTIALITY_CODE = "urn:uuid:f4f85eac-e6cb-4883-b524-f2705394840f"
DE_EVENT_CODE = "urn:uuid:2c6b8cb7-8b2a-4051-b291-b1ae6a575ef4"
DE_FORMAT_CODE = "urn:uuid:a09d5840-386c-46f2-b5ad-9c3699a4309d"
DE_HEALTHCARE_FACILITY_TYPE_CODE = "urn:uuid:f33fb8ac-18af-42cc-ae0e-ed0b0bdb91e1"
DE_PRACTICE_SETTING_CODE = "urn:uuid:cccf5598-8b07-4b77-a05e-ae952c785ead"
DE_TYPE_CODE = "urn:uuid:f0306f51-975f-434e-a61c-c59651d33983"
DE_LIMITED_METADATA = "urn:uuid:ab9b591b-83ab-4d03-8f5d-f93b1fb92e85"
DE_PATIENT_ID = "urn:uuid:58a6f841-87b3-4a3e-92fd-a8ffeff98427"
DE_UNIQUE_ID = "urn:uuid:2e82c1f6-a085-4c72-9da3-8640a32e42ab"

# SubmissionSet (ITI TF-3 4.2.5.2 / Table 4.2.5.2-1)
SS_CLASSIFICATION_NODE = "urn:uuid:a54d6aa5-d40d-43f9-88c5-b4633d873bdd"
SS_AUTHOR = "urn:uuid:a7058bb9-b4e4-4307-ba5b-e3f0ab85e12d"
SS_CONTENT_TYPE_CODE = "urn:uuid:aa543740-bdda-424e-8c96-df4873be8500"
SS_LIMITED_METADATA = "urn:uuid:5003a9db-8d8d-49e6-bf0c-990e34ac7707"
SS_PATIENT_ID = "urn:uuid:6b5aea1a-874d-4603-a4bc-96a0a7b38446"
SS_SOURCE_ID = "urn:uuid:554ac39e-e3fe-47fe-b233-965d2a147832"
SS_UNIQUE_ID = "urn:uuid:96fdda7c-d067-4183-912e-bf5ee74998a8"

# Folder (ITI TF-3 4.2.5.3 / Table 4.2.5.3-1)
FOLDER_CLASSIFICATION_NODE = "urn:uuid:d9d542f3-6cc4-48b6-8870-ea235fbc94c2"
FOLDER_CODE_LIST = "urn:uuid:1ba97051-7806-41a8-a48b-8fce7af683c5"
FOLDER_LIMITED_METADATA = "urn:uuid:2c144a76-29a9-4b7c-af54-b25409fe7d03"
FOLDER_PATIENT_ID = "urn:uuid:f64ffdf0-4b97-4e06-b79f-a52b38ec2f8a"
FOLDER_UNIQUE_ID = "urn:uuid:75df8f67-9973-4fbe-a900-df66cefecc5a"

# Association types (ITI TF-3 4.2.2, Table 4.2.2-1; IsSnapshotOf: On-Demand Documents supplement)
ASSOC_HAS_MEMBER = "urn:oasis:names:tc:ebxml-regrep:AssociationType:HasMember"
ASSOC_RPLC = "urn:ihe:iti:2007:AssociationType:RPLC"
ASSOC_XFRM = "urn:ihe:iti:2007:AssociationType:XFRM"
ASSOC_APND = "urn:ihe:iti:2007:AssociationType:APND"
ASSOC_XFRM_RPLC = "urn:ihe:iti:2007:AssociationType:XFRM_RPLC"
ASSOC_SIGNS = "urn:ihe:iti:2007:AssociationType:signs"
ASSOC_IS_SNAPSHOT_OF = "urn:ihe:iti:2010:AssociationType:IsSnapshotOf"
DOCUMENT_RELATIONSHIPS = frozenset({ASSOC_RPLC, ASSOC_XFRM, ASSOC_APND, ASSOC_XFRM_RPLC, ASSOC_SIGNS})
REPLACING = frozenset({ASSOC_RPLC, ASSOC_XFRM_RPLC})

# coded DocumentEntry / SubmissionSet / Folder attributes: scheme UUID -> attribute name (ITI TF-3 4.2.3)
CODE_SCHEMES: dict[str, str] = {
    DE_CLASS_CODE: "classCode",
    DE_CONFIDENTIALITY_CODE: "confidentialityCode",
    DE_EVENT_CODE: "eventCodeList",
    DE_FORMAT_CODE: "formatCode",
    DE_HEALTHCARE_FACILITY_TYPE_CODE: "healthcareFacilityTypeCode",
    DE_PRACTICE_SETTING_CODE: "practiceSettingCode",
    DE_TYPE_CODE: "typeCode",
    SS_CONTENT_TYPE_CODE: "contentTypeCode",
    FOLDER_CODE_LIST: "codeList",
}
AUTHOR_SCHEMES = frozenset({DE_AUTHOR, SS_AUTHOR})

# XML limits: a metadata document has no business being bigger or deeper
MAX_XML_BYTES = 64 * 1024 * 1024


def _parser() -> etree.XMLParser:
    """No entities, no DTD, no network (XXE and billion laughs), no huge trees."""
    return etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, dtd_validation=False,
                           huge_tree=False, remove_blank_text=False)


def parse_xml(data: bytes) -> etree._Element:
    """Parse ``data`` safely; a DTD (entity declarations) or broken XML raises :class:`XdsParseError`."""
    if len(data) > MAX_XML_BYTES:
        raise XdsParseError(f"XML document too large ({len(data)} bytes)")
    try:
        root = etree.fromstring(data, _parser())
    except etree.XMLSyntaxError as exc:
        raise XdsParseError(f"XML not well-formed: {exc}") from None
    tree = root.getroottree()
    if tree.docinfo.doctype or tree.docinfo.internalDTD is not None:
        raise XdsParseError("XML with a DOCTYPE is refused")
    return root


def slot_values(obj: etree._Element, name: str) -> list[str]:
    """The ``rim:Value`` texts of the direct child ``rim:Slot`` named ``name`` (ebRIM 3.0 4.3.1)."""
    values: list[str] = []
    for slot in obj.iterchildren(f"{RIM}Slot"):
        if slot.get("name") == name:
            values.extend((v.text or "") for v in slot.iterfind(f"{RIM}ValueList/{RIM}Value"))
    return values


def slot_value(obj: etree._Element, name: str) -> str | None:
    """The first value of slot ``name`` or None."""
    values = slot_values(obj, name)
    return values[0] if values else None


def set_slot(obj: etree._Element, name: str, values: Sequence[str]) -> None:
    """Replace (or add) slot ``name`` with ``values``; keeps the ebRIM child order (Slot first)."""
    for slot in list(obj.iterchildren(f"{RIM}Slot")):
        if slot.get("name") == name:
            obj.remove(slot)
    slot = etree.Element(f"{RIM}Slot", name=name)
    value_list = etree.SubElement(slot, f"{RIM}ValueList")
    for v in values:
        etree.SubElement(value_list, f"{RIM}Value").text = v
    slots = list(obj.iterchildren(f"{RIM}Slot"))
    if slots:
        slots[-1].addnext(slot)
    else:
        obj.insert(0, slot)


def external_id(obj: etree._Element, scheme: str) -> str | None:
    """The ``value`` of the ExternalIdentifier of ``scheme`` (ITI TF-3 4.2.3.1.7), None if absent."""
    for ext in obj.iterchildren(f"{RIM}ExternalIdentifier"):
        if ext.get("identificationScheme") == scheme:
            return ext.get("value")
    return None


def localized(obj: etree._Element, tag: str = "Name") -> str | None:
    """The first LocalizedString value of ``rim:Name`` (or ``rim:Description``)."""
    node = obj.find(f"{RIM}{tag}/{RIM}LocalizedString")
    return node.get("value") if node is not None else None


@dataclass(frozen=True)
class Code:
    """A coded attribute: nodeRepresentation, its codingScheme slot and display name."""

    scheme: str
    code: str
    coding_scheme: str
    display: str | None


def classifications(obj: etree._Element, scheme: str) -> list[etree._Element]:
    """The classifications of ``obj`` of ``scheme`` (nested children only, ITI TF-3 4.2.3.1.2)."""
    return [c for c in obj.iterchildren(f"{RIM}Classification") if c.get("classificationScheme") == scheme]


def codes(obj: etree._Element) -> list[Code]:
    """All coded classifications of ``obj`` (schemes in :data:`CODE_SCHEMES`)."""
    out = []
    for c in obj.iterchildren(f"{RIM}Classification"):
        scheme = c.get("classificationScheme") or ""
        if scheme in CODE_SCHEMES:
            out.append(Code(scheme, c.get("nodeRepresentation") or "", slot_value(c, "codingScheme") or "",
                            localized(c)))
    return out


def authors(obj: etree._Element) -> list[etree._Element]:
    """The author classifications of a DocumentEntry or SubmissionSet (ITI TF-3 4.2.3.1.4)."""
    return [c for c in obj.iterchildren(f"{RIM}Classification") if c.get("classificationScheme") in AUTHOR_SCHEMES]


@dataclass
class DocumentEntry:
    """A ``rim:ExtrinsicObject`` DocumentEntry of a submission (ITI TF-3 4.2.3.2)."""

    element: etree._Element
    entry_uuid: str
    unique_id: str | None
    patient_id: str | None
    mime_type: str | None
    hash: str | None
    size: int | None
    repository_unique_id: str | None
    home_community_id: str | None
    object_type: str | None

    @classmethod
    def from_element(cls, element: etree._Element) -> DocumentEntry:
        size_text = slot_value(element, "size")
        try:
            size = int(size_text) if size_text is not None else None
        except ValueError:
            context = f"DocumentEntry {element.get('id')}: size {size_text!r} is not an integer"
            raise XdsFailure(XdsError(REGISTRY_METADATA_ERROR, context)) from None
        return cls(element=element, entry_uuid=element.get("id") or "",
                   unique_id=external_id(element, DE_UNIQUE_ID), patient_id=external_id(element, DE_PATIENT_ID),
                   mime_type=element.get("mimeType"), hash=slot_value(element, "hash"), size=size,
                   repository_unique_id=slot_value(element, "repositoryUniqueId"),
                   home_community_id=element.get("home"), object_type=element.get("objectType"))


@dataclass
class Submission:
    """The objects of one ``lcm:SubmitObjectsRequest`` sorted by role (ITI TF-2b 3.42.4.1.2)."""

    request: etree._Element
    submission_set: etree._Element
    submission_set_uuid: str
    patient_id: str | None
    documents: list[DocumentEntry] = field(default_factory=list)
    folders: list[etree._Element] = field(default_factory=list)
    associations: list[etree._Element] = field(default_factory=list)
    classifications: list[etree._Element] = field(default_factory=list)  # top-level (package kind) ones
    object_refs: list[etree._Element] = field(default_factory=list)


def _classified_as(pkg: etree._Element, node: str, top_level: Sequence[etree._Element]) -> bool:
    """Whether RegistryPackage ``pkg`` is classified by ``node`` (nested or top-level, ITI TF-3 4.2.1.3)."""
    pid = pkg.get("id")
    for c in list(pkg.iterchildren(f"{RIM}Classification")) + list(top_level):
        if c.get("classificationNode") == node and c.get("classifiedObject", pid) == pid:
            return True
    return False


def parse_submission(root: etree._Element) -> Submission:
    """Split an ``lcm:SubmitObjectsRequest`` into its SubmissionSet, DocumentEntries, Folders, Associations.

    Raises :class:`XdsFailure` (XDSRegistryMetadataError) when the structure is not a submission: not a
    SubmitObjectsRequest, no or several SubmissionSets, an object without id, unknown object kinds.
    """
    if root.tag != f"{LCM}SubmitObjectsRequest":
        raise XdsParseError(f"expected lcm:SubmitObjectsRequest, got {root.tag}")
    object_list = root.find(f"{RIM}RegistryObjectList")
    if object_list is None:
        raise XdsParseError("SubmitObjectsRequest without rim:RegistryObjectList")
    errors: list[XdsError] = []
    extrinsic: list[etree._Element] = []
    packages: list[etree._Element] = []
    top_classifications: list[etree._Element] = []
    associations: list[etree._Element] = []
    refs: list[etree._Element] = []
    for obj in object_list:
        if not isinstance(obj.tag, str):
            continue  # comments, processing instructions
        local = etree.QName(obj).localname if obj.tag.startswith(RIM) else None
        if local is None:
            errors.append(XdsError(REGISTRY_METADATA_ERROR, f"unexpected element {obj.tag} in RegistryObjectList"))
            continue
        if not obj.get("id") and local in ("ExtrinsicObject", "RegistryPackage", "Association"):
            errors.append(XdsError(REGISTRY_METADATA_ERROR, f"rim:{local} without id attribute"))
            continue
        if local == "ExtrinsicObject":
            extrinsic.append(obj)
        elif local == "RegistryPackage":
            packages.append(obj)
        elif local == "Classification":
            top_classifications.append(obj)
        elif local == "Association":
            associations.append(obj)
        elif local == "ObjectRef":
            refs.append(obj)
        else:
            errors.append(XdsError(REGISTRY_METADATA_ERROR, f"rim:{local} {obj.get('id')} not allowed in XDS"))
    sets = [p for p in packages if _classified_as(p, SS_CLASSIFICATION_NODE, top_classifications)]
    folders = [p for p in packages if _classified_as(p, FOLDER_CLASSIFICATION_NODE, top_classifications)]
    for p in packages:
        if p not in sets and p not in folders:
            errors.append(XdsError(REGISTRY_METADATA_ERROR,
                                   f"RegistryPackage {p.get('id')} is classified neither as SubmissionSet "
                                   f"({SS_CLASSIFICATION_NODE}) nor as Folder ({FOLDER_CLASSIFICATION_NODE})"))
        elif p in sets and p in folders:
            errors.append(XdsError(REGISTRY_METADATA_ERROR,
                                   f"RegistryPackage {p.get('id')} is classified as SubmissionSet and Folder"))
    if len(sets) != 1:
        errors.append(XdsError(REGISTRY_METADATA_ERROR,
                               f"a submission has exactly one SubmissionSet, found {len(sets)}"))
    documents: list[DocumentEntry] = []
    for e in extrinsic:
        try:
            documents.append(DocumentEntry.from_element(e))
        except XdsFailure as exc:
            errors.extend(exc.errors)
    if errors:
        raise XdsFailure(errors)
    ss = sets[0]
    return Submission(request=root, submission_set=ss, submission_set_uuid=ss.get("id") or "",
                      patient_id=external_id(ss, SS_PATIENT_ID), documents=documents,
                      folders=[f for f in folders if f is not ss], associations=associations,
                      classifications=top_classifications, object_refs=refs)
