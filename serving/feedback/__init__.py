"""Radiologists' feedback: validated, de-identified, spooled, written to the object store for retraining."""
