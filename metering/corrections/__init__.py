"""Corrections (contract section 10): cancelling stored events, replaying dead letters,
importing files. Each is an audited operation whose effect `reconcile` proves."""
