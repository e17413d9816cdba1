"""Cohort contract, simulator, omics preprocessing, splits and the tile-bag loader."""
