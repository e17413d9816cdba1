"""Evaluation of a trained run: embeddings (`embed`), probes (`probe`: task files → `tasks` → `probes` estimators),
statistics and reports, attention heatmaps, the text tower for zero-shot."""
