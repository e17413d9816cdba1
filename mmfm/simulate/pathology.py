"""The pathology report of a simulated case: the facts a pathologist would see, drawn from the latent state
(noisy: grade off by one, findings omitted; not a label oracle), and templated free text stating them."""

from __future__ import annotations

import numpy as np

from mmfm.simulate.latent import DRIVERS, SUBTYPES, Case, sigmoid

PATTERN = {
    "differentiated": ["a predominantly glandular pattern", "well-formed glandular and papillary architecture",
                       "a tubulopapillary growth pattern"],
    "immunoreactive": ["a solid and glandular pattern with prominent lymphoid stroma",
                       "medullary-like growth with a lymphoid-rich stroma"],
    "mesenchymal": ["infiltrative cords and single cells within a desmoplastic stroma",
                    "an infiltrative pattern with marked desmoplasia"],
    "proliferative": ["solid sheets of tumour cells", "a solid growth pattern with high nuclear grade",
                      "solid nests with frequent mitoses"],
}
GRADE_WORDS = {1: ["grade 1", "well differentiated", "low grade (G1)"],
               2: ["grade 2", "moderately differentiated", "intermediate grade (G2)"],
               3: ["grade 3", "poorly differentiated", "high grade (G3)"]}
DIAGNOSIS = ["Invasive carcinoma, {grade}, with {pattern}.", "Invasive carcinoma showing {pattern}; {grade}.",
             "Carcinoma, {grade}. The tumour shows {pattern}."]
DIAGNOSIS_NOS = ["Invasive carcinoma, {grade}.", "Carcinoma, not otherwise specified, {grade}."]
HEADERS = ["", "FINAL DIAGNOSIS: ", "DIAGNOSIS: ", "Microscopic description: "]
FINDINGS = {
    ("necrosis", True): ["Tumour necrosis is present.", "Areas of geographic necrosis are seen.",
                         "Necrosis: present (approximately {necrosis_pct}%).", "Comedo-type necrosis is identified."],
    ("necrosis", False): ["No tumour necrosis is identified.", "Necrosis: absent.", "Negative for necrosis.",
                          "There is no evidence of necrosis."],
    ("lvi", True): ["Lymphovascular invasion is present.", "LVI: identified.",
                    "Tumour emboli are seen within lymphovascular spaces.", "Lymphovascular invasion: present, focal."],
    ("lvi", False): ["No lymphovascular invasion is identified.", "LVI: not identified.",
                     "Lymphovascular invasion: absent.", "Negative for lymphovascular invasion."],
    ("til", "brisk"): ["Brisk tumour-infiltrating lymphocytes.",
                       "Dense lymphocytic infiltrate within and around the tumour.",
                       "TILs: high (approximately {til_pct}% of stroma)."],
    ("til", "non-brisk"): ["Non-brisk tumour-infiltrating lymphocytes.", "A patchy lymphocytic infiltrate is present.",
                           "TILs: intermediate (approximately {til_pct}% of stroma)."],
    ("til", "absent"): ["No significant lymphocytic infiltrate.", "Tumour-infiltrating lymphocytes are absent.",
                        "TILs: low (under 5% of stroma)."],
    ("mitoses", None): ["Mitotic count: {mitoses} per 10 HPF.", "Mitoses number {mitoses} per 10 high-power fields.",
                        "Mitotic activity: {mitoses}/10 HPF."],
    ("size", None): ["Tumour size: {size} cm.", "The tumour measures {size} cm in greatest dimension.",
                     "Greatest tumour dimension {size} cm."],
    ("nodes", True): ["Lymph nodes: {nodes_pos}/{nodes_exam} positive.",
                      "Metastatic carcinoma in {nodes_pos} of {nodes_exam} lymph nodes."],
    ("nodes", False): ["All {nodes_exam} lymph nodes are negative (0/{nodes_exam}).",
                       "Lymph nodes: 0/{nodes_exam}, negative for metastasis."],
    ("margin", True): ["Tumour extends to the {side} margin.", "The {side} margin is involved by carcinoma."],
    ("margin", False): ["Margins are free of tumour (closest {margin_mm} mm).",
                        "Resection margins clear; closest margin {margin_mm} mm ({side})."],
    ("p53", True): ["p53 immunohistochemistry: aberrant (mutant-type) pattern.", "p53 IHC shows mutant-type staining."],
    ("p53", False): ["p53 immunohistochemistry: wild-type pattern.", "p53 IHC shows wild-type staining."],
}
REPORT_GRADE_ERROR = 0.12  # inter-observer variability: reported grade off by one
FINDING_OMITTED = 0.1


def report_facts(case: Case, r: np.random.Generator) -> dict:
    """What a pathologist would see, drawn from the latent state (reports are noisy, not a label oracle)."""
    prol, imm, hyp, strom, _ = case.programmes
    f = {"necrosis": r.random() < sigmoid(1.5 * hyp + 0.5 * prol - 1.0),
         "lvi": r.random() < sigmoid(0.8 * strom + 0.5 * prol - 0.8)}
    til = imm + 0.4 * r.standard_normal()
    f["til"] = "brisk" if til > 0.7 else "non-brisk" if til > -0.4 else "absent"
    grade_err = r.random() < REPORT_GRADE_ERROR
    f["reported_grade"] = int(np.clip(case.grade + (r.choice([-1, 1]) if grade_err else 0), 1, 3))
    f["mitoses"] = int(r.poisson(np.exp(1.5 + 0.8 * prol)))
    f["size"] = round(float(np.exp(np.log(3.0) + 0.4 * r.standard_normal())), 1)
    f["nodes_exam"] = int(r.integers(6, 26))
    f["nodes_pos"] = int(min(r.poisson(np.exp(-0.5 + 0.6 * strom + 0.6 * f["lvi"])), f["nodes_exam"]))
    f["margin"] = r.random() < 0.12
    f["margin_mm"] = round(float(r.uniform(0.5, 15.0)), 1)
    f["side"] = str(r.choice(["deep", "peripheral", "radial", "medial", "lateral"]))
    f["necrosis_pct"] = int(r.integers(1, 8) * 5)
    f["til_pct"] = int(r.integers(2, 18) * 5 if f["til"] == "brisk" else r.integers(1, 8) * 5)
    p53_done = r.random() < 0.25
    tp53 = bool(case.mutations[DRIVERS.index("TP53")])
    aberrant = r.random() < (0.9 if tp53 else 0.05)
    f["p53"] = aberrant if p53_done else None
    f["pattern_stated"] = r.random() >= 0.15
    return {k: (bool(v) if isinstance(v, np.bool_) else v) for k, v in f.items()}


def report_text(case: Case, facts: dict, r: np.random.Generator) -> str:
    """Templated free text: synonyms, negations, sentence order and omissions vary."""
    subtype = SUBTYPES[case.subtype]
    grade = str(r.choice(GRADE_WORDS[facts["reported_grade"]]))
    if facts["pattern_stated"]:
        diag = str(r.choice(DIAGNOSIS)).format(grade=grade, pattern=str(r.choice(PATTERN[subtype])))
    else:
        diag = str(r.choice(DIAGNOSIS_NOS)).format(grade=grade)
    keys = [("necrosis", facts["necrosis"]), ("lvi", facts["lvi"]), ("til", facts["til"]),
            ("mitoses", None), ("size", None), ("nodes", facts["nodes_pos"] > 0), ("margin", facts["margin"])]
    if facts["p53"] is not None:
        keys.append(("p53", facts["p53"]))
    keep = [k for k in keys if r.random() >= FINDING_OMITTED]
    sentences = [str(r.choice(FINDINGS[k])).format(**facts) for k in keep]
    sentences = [sentences[i] for i in r.permutation(len(sentences))]
    return str(r.choice(HEADERS)) + " ".join([diag] + sentences)

