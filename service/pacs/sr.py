"""The standard-DICOM form of a result: a Comprehensive SR that references its source instance.

One SR per (source instance, model version). Its SOP Instance UID is derived from both, so writing it twice
(a retry, a restarted worker) stores the same object, which a PACS keeps once. All SRs of a study by one
model version share one series ("FUSC views"). The document (root: "Fetal ultrasound view classification"):

    CONTAINS CODE  Finding (DCM 121071)            = the view (99FUSC, "VIEW-<name>") or VIEW-WITHHELD
        INFERRED FROM IMAGE  Source of Measurement = the source SOP instance (and frames, multi-frame)
        HAS PROPERTIES TEXT  "View withheld reason" (only when the view is withheld)
    CONTAINS CODE  "Cluster"                       = (99FUSC, "CLUSTER-<id>")
    CONTAINS NUM   "Cluster probability"           = confidence, UCUM {ratio}
    CONTAINS CODE  "Out of distribution"           = SCT Yes / No (absent when the model cannot tell)
    CONTAINS NUM   "OOD score"                     (when the model has one)
    CONTAINS TEXT  "Algorithm version"             = the model version
    CONTAINS IMAGE Source of Measurement           = the source SOP instance

The "99FUSC" codes are private (the 99 prefix of PS3.16 8.2): no standard code names these views.
"""

from __future__ import annotations

from typing import Any

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

SCHEME = "99FUSC"
MANUFACTURER = "fusc"
SERIES_NUMBER = 9901
YES = hd.sr.CodedConcept("373066001", "SCT", "Yes")
NO = hd.sr.CodedConcept("373067005", "SCT", "No")

TITLE = hd.sr.CodedConcept("FUSC-REPORT", SCHEME, "Fetal ultrasound view classification")
CLUSTER = hd.sr.CodedConcept("CLUSTER", SCHEME, "Cluster")
PROBABILITY = hd.sr.CodedConcept("PROBABILITY", SCHEME, "Cluster probability")
OOD = hd.sr.CodedConcept("OOD", SCHEME, "Out of distribution")
OOD_SCORE = hd.sr.CodedConcept("OOD-SCORE", SCHEME, "OOD score")
VERSION = hd.sr.CodedConcept("ALGO-VERSION", SCHEME, "Algorithm version")
WITHHELD_REASON = hd.sr.CodedConcept("WITHHELD-REASON", SCHEME, "View withheld reason")
VIEW_WITHHELD = hd.sr.CodedConcept("VIEW-WITHHELD", SCHEME, "View withheld")
RATIO = hd.sr.CodedConcept("{ratio}", "UCUM", "ratio")


def view_code(view: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(f"VIEW-{view.upper()}", SCHEME, view.replace("_", " "))


def cluster_code(cluster: int) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(f"CLUSTER-{cluster}", SCHEME, f"Cluster {cluster}")


def sr_uid(source_uid: str, model_version: str) -> str:
    return generate_uid(entropy_srcs=["fusc-sr", source_uid, model_version])


def sr_series_uid(study_uid: str, model_version: str) -> str:
    return generate_uid(entropy_srcs=["fusc-sr-series", study_uid, model_version])


# What the SR copies from its source: the patient and study modules (so that the PACS files the SR with its
# study), and the references. Type 2 attributes a source lacks are written empty, as the standard allows.
_EVIDENCE = (
    "SpecificCharacterSet",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "SeriesInstanceUID",
    "SOPClassUID",
    "SOPInstanceUID",
)


def _evidence(source: Dataset) -> Dataset:
    ds = Dataset()
    for keyword in _EVIDENCE:
        value = source.get(keyword)
        if value is not None or keyword != "SpecificCharacterSet":
            setattr(ds, keyword, value)
    return ds


def build_sr(source: Dataset, result: dict[str, Any]) -> hd.sr.ComprehensiveSR:
    """The SR for ``result`` about ``source`` (its header: patient, study and SOP attributes)."""
    source = _evidence(source)
    version = str(result["model_version"])
    multi_frame = int(result.get("n_frames", 1)) > 1
    # 1-based frame numbers, as DICOM counts them.
    frames = [int(i) + 1 for i in result.get("frames", [])] if multi_frame else None

    def image(relationship: str) -> hd.sr.ImageContentItem:
        return hd.sr.ImageContentItem(
            name=codes.DCM.SourceOfMeasurement,
            referenced_sop_class_uid=source.SOPClassUID,
            referenced_sop_instance_uid=source.SOPInstanceUID,
            referenced_frame_numbers=frames,
            relationship_type=relationship,
        )

    view = result.get("view")
    finding = hd.sr.CodeContentItem(
        name=codes.DCM.Finding,
        value=view_code(view) if view else VIEW_WITHHELD,
        relationship_type="CONTAINS",
    )
    children = [image("INFERRED FROM")]
    if not view and result.get("view_reason"):
        children.append(
            hd.sr.TextContentItem(
                name=WITHHELD_REASON, value=str(result["view_reason"]), relationship_type="HAS PROPERTIES"
            )
        )
    finding.ContentSequence = hd.sr.ContentSequence(children)

    items: list[Dataset] = [
        finding,
        hd.sr.CodeContentItem(
            name=CLUSTER, value=cluster_code(int(result["cluster"])), relationship_type="CONTAINS"
        ),
        hd.sr.NumContentItem(
            name=PROBABILITY, value=float(result["confidence"]), unit=RATIO, relationship_type="CONTAINS"
        ),
    ]
    if result.get("ood") is not None:
        items.append(
            hd.sr.CodeContentItem(name=OOD, value=YES if result["ood"] else NO, relationship_type="CONTAINS")
        )
    if result.get("ood_score") is not None:
        items.append(
            hd.sr.NumContentItem(
                name=OOD_SCORE, value=float(result["ood_score"]), unit=RATIO, relationship_type="CONTAINS"
            )
        )
    items.append(hd.sr.TextContentItem(name=VERSION, value=version, relationship_type="CONTAINS"))
    items.append(image("CONTAINS"))

    root = hd.sr.ContainerContentItem(name=TITLE, template_id=None)
    root.ContentSequence = hd.sr.ContentSequence(items)
    return hd.sr.ComprehensiveSR(
        evidence=[source],
        content=root,
        series_instance_uid=sr_series_uid(source.StudyInstanceUID, version),
        series_number=SERIES_NUMBER,
        sop_instance_uid=sr_uid(source.SOPInstanceUID, version),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        series_description="FUSC views",
    )


def read_sr(sr: Dataset) -> dict[str, Any]:
    """The fields of an SR written by ``build_sr``, read back from the dataset (for checks and tools)."""
    out: dict[str, Any] = {"references": set()}

    def pair(c: Dataset) -> tuple[str, str]:
        # Code values past 16 characters travel as LongCodeValue.
        return c.CodingSchemeDesignator, str(c.get("CodeValue") or c.get("LongCodeValue"))

    def code_of(item: Dataset) -> tuple[str, str]:
        return pair(item.ConceptCodeSequence[0])

    def walk(items: Any) -> None:
        for item in items:
            key = pair(item.ConceptNameCodeSequence[0])
            kind = item.ValueType
            if kind == "IMAGE":
                out["references"].add(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            elif key == ("DCM", "121071"):
                scheme, value = code_of(item)
                out["view"] = value[len("VIEW-") :].lower() if value != "VIEW-WITHHELD" else None
            elif key == (SCHEME, "CLUSTER"):
                out["cluster"] = int(code_of(item)[1].split("-", 1)[1])
            elif key == (SCHEME, "PROBABILITY"):
                out["confidence"] = float(item.MeasuredValueSequence[0].NumericValue)
            elif key == (SCHEME, "OOD"):
                out["ood"] = code_of(item) == ("SCT", "373066001")
            elif key == (SCHEME, "ALGO-VERSION"):
                out["model_version"] = str(item.TextValue)
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(sr.ContentSequence)
    return out
