"""Reporting: the model card (built, then rendered), plots (overlays, fairness, cross-site drops) and the result
tables ``medseg results`` renders from MLflow runs."""
