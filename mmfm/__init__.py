"""mmfm: multimodal slide–omics foundation models.

data → models → objectives → train → eval → bridges → cli. See README.md.
"""

__version__ = "0.1.0"

MODALITIES = ("slide", "rna", "protein", "report", "mutation")
"""Every modality mmfm knows. Each is optional per case; presence is always explicit."""
