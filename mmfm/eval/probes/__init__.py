"""The probe estimators and their metrics, one module per kind of probe; the task types that run them over folds
and embeddings live in `mmfm.eval.tasks` (same names: `tasks/survival.py` is the task type, `probes/survival.py`
its estimator).
  classification  linear probe (logistic regression, Patho-Bench protocol) and its metrics
  fewshot         k labelled cases per class drawn from the training fold
  survival        linear Cox models, Harrell's / Uno's C, time-dependent AUC
  retrieval       cross-modal and same-label retrieval
  robustness      PathoROB robustness index: does the neighbourhood follow biology or the medical centre?
"""
