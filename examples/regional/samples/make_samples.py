"""Write the sample messages of the regional example as a HIS / RIS would send them: GB18030 bytes,
segments ended by carriage returns, MSH-18 empty (the channels' ``default_charset`` supplies GB18030).

    python examples/regional/samples/make_samples.py      # rewrites the *.hl7 files beside this script
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent

SAMPLES: dict[str, list[str]] = {
    # HIS -> his-adt: admission of 欧阳娜娜 (local sex 2, local department 0301 = radiology)
    "adt-a01-admit.hl7": [
        "MSH|^~\\&|HIS|H1|IHEHUB|REGION|20260110083000||ADT^A01^ADT_A01|HIS0001|P|2.5",
        "EVN|A01|20260110083000",
        "PID|1||100234^^^H1||欧阳^娜娜||19900307|2|||人民路1号^^上海^^200001^CHN||13812345678",
        "PV1|1|I|W3^12^1||||D01^李^医生|||0301",
    ],
    # HIS -> his-adt: outpatient registration of 曾小明 (local sex 1, department 0101 = internal medicine)
    "adt-a04-register.hl7": [
        "MSH|^~\\&|HIS|H1|IHEHUB|REGION|20260110090000||ADT^A04^ADT_A01|HIS0002|P|2.5",
        "EVN|A04|20260110090000",
        "PID|1||100300^^^H1||曾^小明||19851120|1|||解放路8号^^上海^^200002^CHN||13900001111",
        "PV1|1|O|MZ01||||D02^王^医生|||0101",
    ],
    # HIS -> his-adt: 欧阳娜娜's phone changed (A08), department code of the regional fallback table
    "adt-a08-update.hl7": [
        "MSH|^~\\&|HIS|H1|IHEHUB|REGION|20260110100000||ADT^A08^ADT_A01|HIS0003|P|2.5",
        "EVN|A08|20260110100000",
        "PID|1||100234^^^H1||欧阳^娜娜||19900307|2|||人民路1号^^上海^^200001^CHN||13812340000",
        "PV1|1|I|W3^12^1||||D01^李^医生|||RAD",
    ],
    # HIS -> his-adt: a duplicate registration of 曾小明 (100301) ...
    "adt-a04-duplicate.hl7": [
        "MSH|^~\\&|HIS|H1|IHEHUB|REGION|20260110101000||ADT^A04^ADT_A01|HIS0004|P|2.5",
        "EVN|A04|20260110101000",
        "PID|1||100301^^^H1||曾^小明||19851120|9",
        "PV1|1|O|MZ01|||||||0901",
    ],
    # ... merged into 100300 (A40)
    "adt-a40-merge.hl7": [
        "MSH|^~\\&|HIS|H1|IHEHUB|REGION|20260110102000||ADT^A40^ADT_A39|HIS0005|P|2.5",
        "EVN|A40|20260110102000",
        "PID|1||100300^^^H1||曾^小明||19851120|1",
        "MRG|100301^^^H1",
    ],
    # a department code that neither H1's table nor the regional fallback knows: refused (AE)
    "broken-adt-unknown-department.hl7": [
        "MSH|^~\\&|HIS|H1|IHEHUB|REGION|20260110110000||ADT^A01^ADT_A01|HIS0099|P|2.5",
        "EVN|A01|20260110110000",
        "PID|1||100999^^^H1||单^田芳||19700101|2",
        "PV1|1|I|W5^1^1|||||||7777",
    ],
    # RIS -> ris-orders: an MR examination for 欧阳娜娜 (local modality MRI, local sex 2)
    "orm-o01-mri.hl7": [
        "MSH|^~\\&|RIS|H1|IHEHUB|REGION|20260110110000||ORM^O01|RIS0001|P|2.3.1",
        "PID|||100234^^^H1||欧阳^娜娜||19900307|2",
        "PV1||I|W3^12^1",
        "ORC|NW|ORD0001|RA20260110001||SC||^^^20260111093000||20260110110000|||D01^李^医生",
        "OBR|1|ORD0001|RA20260110001|MR0101^头颅MR平扫^L||||||||||||D01^李^医生||RA20260110001|RP0001|SPS0001"
        "||||MRI|||^^^20260111093000",
        "ZDS|1.2.156.112604.1.1.3.20260110001^RIS^Application^DICOM",
    ],
    # RIS -> ris-reports: the signed report of that examination
    "oru-r01-report.hl7": [
        "MSH|^~\\&|RIS|H1|IHEHUB|REGION|20260111150000||ORU^R01^ORU_R01|RIS0002|P|2.5",
        "PID|1||100234^^^H1||欧阳^娜娜||19900307|2",
        "OBR|1|ORD0001|RA20260110001|MR0101^头颅MR平扫^L|||20260111093000|||||||||||||||20260111150000||MR|F"
        "|||||||D05&张&医生",
        "OBX|1|TX|18782-3^影像所见^LN||双侧大脑半球对称，脑实质内未见异常信号。||||||F",
        "OBX|2|TX|19005-8^诊断意见^LN||头颅MR平扫未见明显异常。||||||F",
    ],
}


def write_all(folder: Path = HERE) -> list[Path]:
    """Write every sample as GB18030 bytes with CR segment ends; returns the files written."""
    written = []
    for name, segments in SAMPLES.items():
        path = folder / name
        path.write_bytes(("\r".join(segments) + "\r").encode("gb18030"))
        written.append(path)
    return written


if __name__ == "__main__":
    for p in write_all():
        print(p)
