"""The cohort contract (cohort, bags, TCGA barcodes), sampling, splits, omics transforms and the tile-bag loader.

Producers of cohorts (mmfm.simulate, mmfm.importers) sit above this package and write what it reads."""
