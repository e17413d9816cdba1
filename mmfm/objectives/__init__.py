"""Contrastive objectives over modality pairs: masked multi-positive SigLIP and InfoNCE, global or sharded."""

from mmfm.objectives.multimodal import LogitParams, ObjectiveConfig, multimodal_loss, pair_name, resolve_pairs

__all__ = ["LogitParams", "ObjectiveConfig", "multimodal_loss", "pair_name", "resolve_pairs"]
