"""One rule for a case with several samples or aliquots (re-sequenced, several vials, tumour + metastasis).

Only samples whose TCGA sample-type code is in `sample_types` (default: patient tumour codes 01-09 and 40) are
candidates; the others (normals 10-14, controls, cell lines) are listed and not used. The candidates of a case are
ranked by the barcode: lowest sample-type code first (01 primary solid tumour, then 02 recurrent, 03 primary blood
cancer, ..., 06 metastatic), then the lowest vial, portion, analyte, plate and centre, then the source name (a GDC
sample sheet gives sample-level ids only, so two files of one sample tie on the barcode and the file name decides).
Rules:
  first  the top-ranked sample only (default: one well-defined biological sample per case);
  mean   omics: the mean over every candidate of the top-ranked sample type (never mixing tumour types);
  any    mutations: mutated if any candidate of the top-ranked sample type carries a qualifying variant;
  error  a case with more than one candidate is an error.
The samples used, the ones not used and the rule are recorded per case in the import report.
"""

from __future__ import annotations

from dataclasses import dataclass

from mmfm.data import tcga
from mmfm.importers.common import ImportDataError, ImportReport

RULE_TEXT = {
    "first": "one sample per case: lowest sample-type code (01 primary tumour first), then lowest vial, portion, "
             "analyte, plate, centre, then source name",
    "mean": "mean over the case's samples of its best (lowest-code) sample type",
    "any": "mutated if any sample of the case's best (lowest-code) sample type carries a qualifying variant",
    "error": "a case with several samples is an error",
}


@dataclass(frozen=True)
class Candidate:
    source: str  # file name or matrix column: unique among the candidates
    barcode: tcga.Barcode


def select(cands: list[Candidate], rule: str, sample_types: tuple[str, ...], report: ImportReport,
           what: str) -> dict[str, list[Candidate]]:
    """case → the candidates the rule uses (ranked). Fills report.duplicates / unmatched / per_case."""
    if rule not in RULE_TEXT:
        raise ValueError(f"aliquot rule {rule!r} is not one of {sorted(RULE_TEXT)}")
    other = [f"{c.source} ({c.barcode.sample_type})" for c in cands if c.barcode.sample_code not in sample_types]
    report.unmatch(f"{what} of sample types not in sample_types {list(sample_types)}", other)
    by_case: dict[str, list[Candidate]] = {}
    for c in cands:
        if c.barcode.sample_code in sample_types:
            by_case.setdefault(c.barcode.case, []).append(c)
    out: dict[str, list[Candidate]] = {}
    for case in sorted(by_case):
        ranked = sorted(by_case[case], key=lambda c: (c.barcode.rank(), c.source))
        if len(ranked) > 1 and rule == "error":
            raise ImportDataError(f"case {case}: {len(ranked)} {what} ({', '.join(c.source for c in ranked)}) and "
                                  "aliquot rule 'error'; choose 'first' or 'mean'/'any'")
        best = ranked[0].barcode.sample_code
        used = ranked[:1] if rule == "first" else [c for c in ranked if c.barcode.sample_code == best]
        rest = [c for c in ranked if c not in used]
        if len(ranked) > 1:
            report.duplicate(f"cases with several {what} (rule '{rule}')",
                             [f"{case}: used {', '.join(c.barcode.text for c in used)}"
                              + (f"; not used {', '.join(c.barcode.text for c in rest)}" if rest else "")])
        report.per_case.setdefault(case, {}).update({
            "rule": rule, "samples": [c.barcode.text for c in used], "sources": [c.source for c in used],
            "not_used": [c.source for c in rest]})
        out[case] = used
    return out
