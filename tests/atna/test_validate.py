"""Schema + Schematron validation: the corpus verdicts, the verdict cache (it must never change a verdict),
the fallback for rules that are not XPath 1.0, and clear errors for unusable inputs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ihehub.atna import AuditContext, Endpoint, Validator, ValidatorError, parse_xml
from ihehub.atna.validate import _literal_attributes
from tests.atna.test_builders import build, cases

# IPF samples that do not meet the connectathon rules (the samples, not the rules, are at fault)
KNOWN_RULE_FAILURES = {
    "pixv3sourcefeed.xml": "Source must have UserID",
    "xpidsource.xml": "Patient ParticipantObjectIdentification",
}


def test_corpus_samples_against_the_rules(corpus: Path, validator: Validator) -> None:
    for path in sorted((corpus / "ipf" / "audit").glob("*.xml")):
        result = validator.validate(path.read_bytes())
        if path.name in KNOWN_RULE_FAILURES:
            assert not result.valid
            assert not any(e.startswith("schema:") for e in result.errors), result.errors
            assert any(KNOWN_RULE_FAILURES[path.name] in e for e in result.errors), result.errors
        else:
            assert result.valid, f"{path.name}: {result.errors}"


def test_the_actor_whose_rules_pass_is_named(corpus: Path, validator: Validator) -> None:
    feed_by_source = validator.validate((corpus / "ipf/audit/pixfeedsource.xml").read_bytes())
    feed_by_manager = validator.validate((corpus / "ipf/audit/pixfeed.xml").read_bytes())
    assert feed_by_source.rules == "ITI-08_Patient_Identity_Feed/110110/mt01DG.sch"
    assert feed_by_manager.rules == "ITI-08_Patient_Identity_Feed/110110/mt02DG.sch"


def test_rule_failures_are_explained(corpus: Path, validator: Validator) -> None:
    xml = (corpus / "ipf/audit/pixquery.xml").read_bytes()
    broken = xml.replace(b'EventActionCode="E"', b'EventActionCode="R"').replace(b' AlternativeUserID="18996"', b"")
    result = validator.validate(broken)
    assert not result.valid
    assert any("EventActionCode must be 'E'" in e for e in result.errors)
    assert all(e.startswith("ITI-09_PIX_Query/110112/") for e in result.errors)


def test_schema_errors_name_the_line(validator: Validator) -> None:
    result = validator.validate(b"<AuditMessage>\n<Bogus/>\n</AuditMessage>")
    assert not result.valid
    assert result.errors[0].startswith("schema: line 2:")


def test_not_xml_is_invalid_not_an_exception(validator: Validator) -> None:
    result = validator.validate(b"\x00\x01 garbage")
    assert not result.valid and "not well-formed" in result.errors[0]
    assert validator.validate(b'<!DOCTYPE x [<!ENTITY e "x">]><AuditMessage/>').errors[0].startswith(
        "document type declarations")


def test_iti18_rules_that_are_not_xpath1_are_evaluated_one_by_one(audit: AuditContext, peer: Endpoint,
                                                                   xsd: Path, rules: Path) -> None:
    fresh = Validator(xsd, rules)  # the first run finds out that the compiled rules fail
    result = fresh.validate(build(audit, peer, "ITI-18", "source").to_xml())
    assert result.valid, result.errors
    assert any("cannot be evaluated" in w and "QueryEncoding" in w for w in result.warnings)
    wrong = build(audit, peer, "ITI-18", "source").to_xml().replace(b'EventActionCode="E"', b'EventActionCode="R"')
    result = fresh.validate(wrong)
    assert not result.valid and any("EventActionCode must be 'E'" in e for e in result.errors)


def mutations(xml: bytes) -> list[bytes]:
    """Variants of a message that differ in what rules look at: codes, emptiness, structure."""
    out = [
        xml.replace(b'EventActionCode="E"', b'EventActionCode="R"', 1),
        xml.replace(b'EventActionCode="C"', b'EventActionCode="D"', 1),
        re.sub(rb' AlternativeUserID="[^"]*"', b"", xml, count=1),
        re.sub(rb' AlternativeUserID="[^"]*"', b' AlternativeUserID=""', xml, count=1),
        xml.replace(b'NetworkAccessPointTypeCode="2"', b'NetworkAccessPointTypeCode="5"', 1),
        xml.replace(b'codeSystemName="DCM"', b'codeSystemName="dcm"', 1),
        xml.replace(b'csd-code="110153"', b'csd-code="110152"', 1),
        re.sub(rb"<ParticipantObjectQuery>[^<]*<", b"<ParticipantObjectQuery><", xml),
        re.sub(rb'type="MSH-10" value="[^"]*"', b'type="MSH-10" value=""', xml),
        xml.replace(b'ParticipantObjectTypeCodeRole="1"', b'ParticipantObjectTypeCodeRole="24"', 1),
        xml.replace(b'csd-code="110153"', b'csd-code="&#49;10153"', 1),  # a character reference spelling a code
        xml.replace(b' UserID="', b' UserID="a&gt;b', 1),
    ]
    return [m for m in out if m != xml]


def test_the_verdict_cache_never_changes_a_verdict(corpus: Path, xsd: Path, rules: Path, audit: AuditContext,
                                                   peer: Endpoint) -> None:
    cached, uncached = Validator(xsd, rules), Validator(xsd, rules, cache_size=0)
    docs = [p.read_bytes() for p in sorted((corpus / "ipf" / "audit").glob("*.xml"))]
    docs += [build(audit, peer, key, side).to_xml() for key, side in cases()]
    docs += [m for d in list(docs) for m in mutations(d)]
    for doc in docs + docs:  # twice: the second round is answered from the cache
        a, b = cached.validate(doc), uncached.validate(doc)
        assert (a.valid, a.errors) == (b.valid, b.errors), doc[:300]
    assert cached.cache_hits > len(docs) // 2
    assert uncached.cache_hits == 0


def test_the_cache_key_keeps_what_the_rules_compare(xsd: Path, rules: Path, corpus: Path) -> None:
    v = Validator(xsd, rules)
    assert v._skeleton is not None
    doc = parse_xml((corpus / "ipf/audit/pixquery.xml").read_bytes())
    key = v._skeleton.key(doc)
    assert key is not None
    assert b'UserID="x"' in key and b"MESA" not in key  # free values are masked
    assert b"\x00110153\x00" in key and b"\x00ITI-9\x00" in key  # compared codes are kept
    assert v._skeleton.key(parse_xml(b"<AuditMessage><!-- c --></AuditMessage>")) is None


def test_rule_analysis_refuses_what_a_key_would_not_preserve() -> None:
    assert _literal_attributes(["@csd-code='110110'", "count(A[@x!=''])=1", "B!=''"]) == {"csd-code": {"110110"}}
    assert _literal_attributes(["@n=1"]) == {"n": None}
    assert _literal_attributes(["string-length(@UserID) > 3"]) is None
    assert _literal_attributes(["ParticipantObjectQuery='abc'"]) is None
    assert _literal_attributes(["@a=@b"]) is None
    assert _literal_attributes(["@a=$v"]) is None


def test_unusable_schema_or_folder(tmp_path: Path, xsd: Path) -> None:
    with pytest.raises(ValidatorError, match="cannot read"):
        Validator(tmp_path / "missing.xsd")
    bad = tmp_path / "bad.xsd"
    bad.write_bytes(b"<notaschema/>")
    with pytest.raises(ValidatorError, match="not a usable XML schema"):
        Validator(bad)
    with pytest.raises(ValidatorError, match="does not exist"):
        Validator(xsd, tmp_path / "no-rules")


def test_schema_only_validator_has_no_rules(xsd: Path, corpus: Path) -> None:
    v = Validator(xsd)
    assert v.rule_keys == []
    assert v.validate((corpus / "ipf/audit/xpidsource.xml").read_bytes()).valid


def test_rules_are_indexed_by_transaction_and_event(validator: Validator) -> None:
    keys = set(validator.rule_keys)
    assert {("ITI-8", "110110"), ("ITI-9", "110112"), ("ITI-43", "110106"), ("110122", "110114")} <= keys
    assert len(validator.rule_files("ITI-08", "110110")) == 4
