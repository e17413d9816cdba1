"""PyTorch bridges: whole-slide images → TRIDENT-compatible tile-feature bags (`mmfm extract`), torch ⇄ JAX.

readers (OpenSlide / tiffslide / plain images, exact MPP geometry), tissue (Otsu segmentation, fragments, tile
grid, QC), encoders (timm registry, offline weights), extract (the pipeline and CLI), dlpack (zero-copy hand-off).
Only this package imports torch; nothing here downloads.
"""
