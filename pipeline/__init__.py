"""Photobooth's machine-learning pipeline: pure Python + torch, no Django.

Each stage is a small function that takes its models as arguments, a typed config
dataclass, a progress callback and a cancel token, and returns a typed result. The
Django app (`studio/jobs.py`) and the command line (`python -m pipeline`) are thin
callers of these functions.
"""
