"""The view taxonomy: the views a cluster can be named after, how each data set's labels read in it, and the
groups the merged-view tables score at. One home for every list of views in training, service and review.

Pure Python (no numpy, no torch): the service and the review web app import it as they are.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class View:
    """One view of the taxonomy and the words that name it on screen.

    ``coarse`` is the anatomy group the view belongs to (the views of one group are sub-planes of one
    structure). ``plane`` words name the plane itself ("TT", "4CH", "SPINE"); ``measure`` words are
    measurements usually taken on it ("BPD", "APD", "CL") or looser hints ("HEART") and count half as much
    when OCR reads them (training/data/ocr.py). A word in both lists ("HC", "FL") counts as a plane name
    when it stands alone and as a measurement when a number follows it.
    """

    name: str
    coarse: str
    title: str
    plane: tuple[str, ...] = ()
    measure: tuple[str, ...] = ()
    generic: bool = False  # a plane-less name of its coarse group: yields to a named sub-plane


# The 15 views of a second-trimester anatomy scan, after the FUSC paper; the phantom views (PHANTOM_VIEWS)
# are among them, so that OCR pseudo-labels, phantom labels and cluster names compare directly.
TAXONOMY: tuple[View, ...] = (
    View("brain", "brain", "fetal head, plane not named (HC/BPD measured)",
         plane=("HC", "BPD", "HEAD", "BRAIN", "BIPARIETAL"), measure=("HC", "BPD", "OFD"), generic=True),
    View("brain_tv", "brain", "trans-ventricular plane",
         plane=("TV", "TRANSVENTRICULAR", "TRANS VENTRICULAR", "VENTRICULAR", "VENTRICLES"),
         measure=("VP", "LVW")),
    View("brain_tt", "brain", "trans-thalamic plane",
         plane=("TT", "TRANSTHALAMIC", "TRANS THALAMIC", "THALAMIC", "THALAMI")),
    View("brain_tc", "brain", "trans-cerebellar plane",
         plane=("TC", "TCB", "TRANSCEREBELLAR", "TRANS CEREBELLAR", "CEREBELLAR", "CEREBELLUM", "CEREB"),
         measure=("TCD", "NF")),
    View("thorax_4ch", "heart", "four-chamber view",
         plane=("4CH", "4CV", "4 CHAMBER", "4CHAMBER", "FOUR CHAMBER", "FOURCH"),
         measure=("TC", "CTR", "HEART")),
    View("thorax_lvot", "heart", "left ventricular outflow tract",
         plane=("LVOT", "5CH", "5 CHAMBER", "FIVE CHAMBER", "LV OUTFLOW", "AORTIC OUTFLOW")),
    View("thorax_rvot", "heart", "right ventricular outflow tract",
         plane=("RVOT", "RV OUTFLOW", "PULMONARY OUTFLOW")),
    View("thorax_3vv", "heart", "three-vessel (and trachea) view",
         plane=("3VV", "3VT", "3VTV", "3 VESSEL", "THREE VESSEL", "THREE VESSELS", "3 VESSELS")),
    View("abdomen", "abdomen", "abdominal circumference plane",
         plane=("AC", "ABDOMEN", "STOMACH"),
         measure=("AC", "APD", "TAD", "AAD", "APAD", "TTD", "ABD", "ABDO")),
    View("kidneys", "kidneys", "kidneys (transverse or coronal)",
         plane=("KIDNEYS", "KIDNEY", "KIDS", "RENAL"), measure=("RPD", "APRPD")),
    View("femur", "femur", "femur length plane", plane=("FL", "FEMUR"), measure=("FL",)),
    View("spine", "spine", "spine (sagittal, coronal or axial)", plane=("SPINE", "SAG SPINE", "VERTEBRAE")),
    View("profile", "face", "mid-sagittal face profile", plane=("PROFILE", "FACE", "SAG FACE", "NASAL BONE"),
         measure=("NB", "NBL")),
    View("lips", "face", "coronal view of nose and lips",
         plane=("LIPS", "LIP", "UPPER LIP", "NOSE LIPS", "NOSE AND LIPS", "NOSE LIP", "MOUTH")),
    View("cervix", "cervix", "maternal cervix", plane=("CERVIX", "CX", "CERV"), measure=("CL",)),
)  # fmt: skip
# Whatever is none of the above (maternal structures other than the cervix, placenta, a view off plane).
# It has no words: text on screen never names it, so OCR never gives it.
OTHER = View("other", "other", "none of the views above")
# Every name a cluster or a label can take, with the view it stands for.
VIEWS: dict[str, View] = {v.name: v for v in (*TAXONOMY, OTHER)}
COARSE_GROUPS: tuple[str, ...] = tuple(dict.fromkeys(v.coarse for v in VIEWS.values()))

# The views the phantom generator draws (training/data/phantoms.py), in the order it plans them: the
# order fixes which image of a seed gets which view, so a reordering changes every phantom set.
PHANTOM_VIEWS: tuple[str, ...] = (
    "brain",
    "abdomen",
    "femur",
    "thorax_4ch",
    "spine",
    "profile",
    "kidneys",
    "cervix",
)

# ------------------------------------------------------------------------------------ data set labels
# FETAL_PLANES_DB (Burgos-Artizzu et al. 2020), its "Plane" column as the published CSV writes it. The
# thorax plane of that data set is the four-chamber view; its brain images name their plane in a second
# column (below), and "Fetal brain" alone is the head without a named plane.
FPDB_BRAIN = "Fetal brain"
FPDB_PLANES: dict[str, str] = {
    FPDB_BRAIN: "brain",
    "Fetal abdomen": "abdomen",
    "Fetal femur": "femur",
    "Fetal thorax": "thorax_4ch",
    "Maternal cervix": "cervix",
    "Other": "other",
}
# Its "Brain_plane" column: the sub-plane of a brain image ("Other" for a brain image of none of these,
# FPDB_NOT_BRAIN for every other plane). Readers of the ``fpdb-fine``/``csv-fine`` kinds use these as the
# fine labels of brain images.
FPDB_BRAIN_PLANES: dict[str, str] = {
    "Trans-ventricular": "brain_tv",
    "Trans-thalamic": "brain_tt",
    "Trans-cerebellum": "brain_tc",
}
FPDB_NOT_BRAIN = "Not A Brain"

# Label -> view, per data set. HC18 (van den Heuvel et al. 2018) has no label column of its own: every
# image is a head at the HC plane, labelled as FETAL_PLANES_DB labels a head (../shared/data/hc18). Phantom
# labels are the view names themselves.
DATASET_LABELS: dict[str, dict[str, str]] = {
    "fetal_planes_db": {**FPDB_PLANES, **FPDB_BRAIN_PLANES},
    "hc18": {FPDB_BRAIN: "brain"},
    "phantoms": {name: name for name in PHANTOM_VIEWS},
}
# Every data set's labels in one table (a label means the same view in every data set that uses it).
LABEL_VIEW: dict[str, str] = {
    label: view for labels in DATASET_LABELS.values() for label, view in labels.items()
}
_LABEL_VIEW_FOLDED = {label.lower(): view for label, view in {**LABEL_VIEW, **{n: n for n in VIEWS}}.items()}


def view_of_label(label: str | None) -> str | None:
    """The view a data set's label stands for (in any case; a view name stands for itself), else None."""
    if not label:
        return None
    return _LABEL_VIEW_FOLDED.get(label.strip().lower())


# ----------------------------------------------------------------------------------- merged views
# Paper Table 2 scores the same clusters again with the sub-planes of one body region merged. Fine label
# -> merged view; labels not listed stay as they are. FETAL_PLANES_DB's brain sub-planes merge back into
# its own brain label, so a fine run's merged table reads like a run on the published planes. The view
# names merge by body region, which is coarser than a view's ``coarse`` group: the face goes with the
# head and the heart views are the thorax.
MERGED_GROUPS: tuple[str, ...] = ("head", "thorax", "abdomen", "spine", "femur", "cervix")
MERGED_VIEWS: dict[str, str] = {
    **{plane: FPDB_BRAIN for plane in FPDB_BRAIN_PLANES},
    "brain": "head",
    "brain_tv": "head",
    "brain_tt": "head",
    "brain_tc": "head",
    "profile": "head",
    "lips": "head",
    "thorax_4ch": "thorax",
    "thorax_lvot": "thorax",
    "thorax_rvot": "thorax",
    "thorax_3vv": "thorax",
    "abdomen": "abdomen",
    "kidneys": "abdomen",
    "spine": "spine",
    "femur": "femur",
    "cervix": "cervix",
}
