"""TCGA barcodes: the one place where an aliquot, sample, slide or file name meets its case (participant).

    TCGA-{TSS}-{participant}-{sample}{vial}-{portion}{analyte}-{plate}-{centre}    aliquot  TCGA-02-0001-01C-01D-0182-01
    TCGA-{TSS}-{participant}-{sample}{vial}-{portion}-{section}                  slide    TCGA-02-0001-01C-01-TS1
    TCGA-{TSS}-{participant}-{sample}{vial}-{portion}-{plate}-{centre}           RPPA shipped portion
and every prefix down to the participant `TCGA-02-0001` (= the case). GDC slide files append the file's UUID:
`TCGA-05-4395-01Z-00-DX1.20205276-CA16-46B3-914B-A42F6D06C2AB.svs`. The tissue source site (TSS, chars 6-7) is the
institution that sent the tissue: mmfm writes it as the case's `site`, which site-preserved folds keep together
(stain and scanner differ between centres, so a probe could otherwise score by recognising the centre).
Slide section DX = FFPE diagnostic slide; TS/BS/MS = top/bottom/middle section of the frozen (OCT) block.
Source: GDC docs "TCGA Barcode" and code tables (summary in /work/shared/reference/gdc_tcga_formats.md §7).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

SAMPLE_TYPES = {
    "01": "Primary Solid Tumor", "02": "Recurrent Solid Tumor",
    "03": "Primary Blood Derived Cancer - Peripheral Blood", "04": "Recurrent Blood Derived Cancer - Bone Marrow",
    "05": "Additional - New Primary", "06": "Metastatic", "07": "Additional Metastatic",
    "08": "Human Tumor Original Cells", "09": "Primary Blood Derived Cancer - Bone Marrow",
    "10": "Blood Derived Normal", "11": "Solid Tissue Normal", "12": "Buccal Cell Normal",
    "13": "EBV Immortalized Normal", "14": "Bone Marrow Normal", "20": "Control Analyte",
    "40": "Recurrent Blood Derived Cancer - Peripheral Blood", "50": "Cell Lines",
    "60": "Primary Xenograft Tissue", "61": "Cell Line Derived Xenograft Tissue",
}
TUMOUR_CODES = ("01", "02", "03", "04", "05", "06", "07", "08", "09", "40")  # patient tumour samples
ANALYTES = {"D": "DNA", "G": "Whole Genome Amplification (GenomePlex)", "H": "mirVana RNA", "R": "RNA",
            "T": "Total RNA", "W": "Whole Genome Amplification (Repli-G)",
            "X": "Whole Genome Amplification (Repli-G X)"}
SECTIONS = {"DX": "FFPE", "TS": "frozen", "BS": "frozen", "MS": "frozen"}

_CASE = re.compile(r"TCGA-([A-Z0-9]{2})-([A-Z0-9]{4})")
_SAMPLE = re.compile(r"(\d{2})([A-Z]?)")
_PORTION = re.compile(r"(\d{2})([A-Z]?)")
_PLATE = re.compile(r"[A-Z0-9]{4}")
_CENTRE = re.compile(r"\d{2}")
_SECTION = re.compile(r"(DX|TS|BS|MS)([A-Z0-9]{1,2})")
EXAMPLE = "TCGA-A2-A0T2-01A-11R-A084-07"


class BarcodeError(ValueError):
    """A name that must be a TCGA barcode is not one; the message says where and what was expected."""


@dataclass(frozen=True)
class Barcode:
    """A parsed TCGA barcode; fields after the participant are None when the barcode stops earlier."""

    text: str
    site: str  # tissue source site (TSS), e.g. 'A2'
    participant: str  # 4 characters, e.g. 'A0T2'
    sample_code: str | None = None  # '01' primary solid tumour ... '11' solid tissue normal
    vial: str | None = None  # 'A', 'B', ...
    portion: str | None = None  # '01' ... '99' ('00' for some slides)
    analyte: str | None = None  # 'D' DNA, 'R' RNA, ...
    plate: str | None = None
    centre: str | None = None
    section: str | None = None  # slide section, e.g. 'DX1', 'TS1', 'BSA'

    @property
    def case(self) -> str:
        """The participant barcode `TCGA-XX-XXXX`: mmfm's case_id."""
        return f"TCGA-{self.site}-{self.participant}"

    @property
    def sample(self) -> str | None:
        """Sample barcode `TCGA-XX-XXXX-01A` (vial included when the barcode has one)."""
        return None if self.sample_code is None else f"{self.case}-{self.sample_code}{self.vial or ''}"

    @property
    def sample_type(self) -> str | None:
        return None if self.sample_code is None else SAMPLE_TYPES.get(self.sample_code, f"code {self.sample_code}")

    @property
    def is_tumour(self) -> bool:
        return self.sample_code in TUMOUR_CODES

    @property
    def preservation(self) -> str | None:
        """'FFPE' (DX), 'frozen' (TS/BS/MS) or None when this is not a slide barcode."""
        return None if self.section is None else SECTIONS[self.section[:2]]

    def rank(self) -> tuple:
        """Order of preference among a case's aliquots: lowest sample code (01 primary tumour first), then the
        lowest vial, portion, analyte, plate and centre. Missing parts sort last; the text breaks exact ties."""
        def part(v):
            return (1, "") if v is None else (0, v)
        return (part(self.sample_code), part(self.vial), part(self.portion), part(self.analyte), part(self.plate),
                part(self.centre), self.text)


def _error(text: str, where: str, why: str) -> BarcodeError:
    prefix = f"{where}: " if where else ""
    return BarcodeError(f"{prefix}{text!r} is not a TCGA barcode ({why}; expected "
                        f"TCGA-<TSS>-<participant>[-<sample><vial>[-<portion><analyte>[-<plate>-<centre>]]], "
                        f"e.g. {EXAMPLE}, or a slide barcode such as TCGA-A2-A0T2-01Z-00-DX1)")


def parse_barcode(text: str, where: str = "") -> Barcode:
    """Parse a TCGA barcode (participant, sample, portion, aliquot or slide level); BarcodeError otherwise.
    Letters are upper-cased first (barcodes are upper case; some tables lower-case them)."""
    raw = str(text).strip()
    parts = raw.upper().split("-")
    head = _CASE.fullmatch("-".join(parts[:3]))
    if head is None:
        raise _error(raw, where, "it must start TCGA-<2-character TSS>-<4-character participant>")
    kw: dict[str, str | None] = {"site": head[1], "participant": head[2]}
    rest = parts[3:]
    if rest:
        m = _SAMPLE.fullmatch(rest[0])
        if m is None:
            raise _error(raw, where, f"sample part {rest[0]!r} must be 2 digits + optional vial letter")
        kw["sample_code"], kw["vial"] = m[1], m[2] or None
    if len(rest) > 1:
        m = _PORTION.fullmatch(rest[1])
        if m is None:
            raise _error(raw, where, f"portion part {rest[1]!r} must be 2 digits + optional analyte letter")
        kw["portion"], kw["analyte"] = m[1], m[2] or None
    if len(rest) == 3 and kw["analyte"] is None and _SECTION.fullmatch(rest[2]):
        kw["section"] = rest[2]
    elif len(rest) > 2:
        if not _PLATE.fullmatch(rest[2]):
            raise _error(raw, where, f"part {rest[2]!r} is neither a 4-character plate nor a slide section "
                                     "(DX/TS/BS/MS + 1-2 characters)")
        kw["plate"] = rest[2]
    if len(rest) > 3:
        if not _CENTRE.fullmatch(rest[3]):
            raise _error(raw, where, f"centre part {rest[3]!r} must be 2 digits")
        kw["centre"] = rest[3]
    if len(rest) > 4:
        raise _error(raw, where, "too many parts")
    return Barcode(text=raw.upper(), **kw)


def is_barcode(text: str) -> bool:
    try:
        parse_barcode(text)
    except BarcodeError:
        return False
    return True


def case_of(text: str, where: str = "") -> str:
    """The case (participant barcode) of any TCGA barcode; BarcodeError for anything else."""
    return parse_barcode(text, where).case


def site_of(case_id: str) -> str | None:
    """The tissue source site of a TCGA id, or None for a non-TCGA id (no site can be derived)."""
    return parse_barcode(case_id).site if is_barcode(case_id) else None


def fill_sites(case_ids: Iterable[str], sites: Iterable[str]) -> list[str]:
    """Each case's site: the one already known, else the tissue source site of a TCGA id, else "" (unknown).
    Every writer of cases.csv (importers, `mmfm extract`) fills sites this one way."""
    return [str(s) if s else site_of(str(c)) or "" for c, s in zip(case_ids, sites)]


def name_barcode(name: str) -> str:
    """The barcode part of a file name or slide id: the text before the first '.', so
    `TCGA-05-4395-01Z-00-DX1.<uuid>.svs`, `TCGA-05-4395-01Z-00-DX1.<uuid>` and `TCGA-05-4395.txt` all work."""
    return str(name).rsplit("/", 1)[-1].split(".", 1)[0]


def parse_slide_name(name: str, where: str = "") -> Barcode:
    """A slide file name or id (with or without the GDC `.<uuid>` suffix and extension) → its slide barcode;
    BarcodeError unless it is a TCGA slide barcode (one that ends with its section, e.g. -DX1)."""
    bc = parse_barcode(name_barcode(name), where)
    if bc.section is None:
        raise _error(name_barcode(name), where, "a slide barcode ends with its section, e.g. -DX1 or -TS1")
    return bc


def slide_case(name: str) -> str | None:
    """The case of a TCGA-named slide file / id (any barcode level before the first '.'), else None."""
    text = name_barcode(name)
    return parse_barcode(text).case if is_barcode(text) else None


def slide_preservation(name: str) -> str | None:
    """'FFPE' / 'frozen' for a TCGA slide name, None for anything else (non-TCGA or no section)."""
    text = name_barcode(name)
    return parse_barcode(text).preservation if is_barcode(text) else None
