"""Plumbing that no part of the method depends on: atomic file writes (`io`), exact resume with
per-step reseeding (`resume`), small Lightning callbacks (`callbacks`), and optional
dependencies named by their extra when missing (`optional`).
"""
