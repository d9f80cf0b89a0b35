"""Importance matrices: files.py reads and writes llama-imatrix's two file formats, compute.py
computes one the way llama-imatrix does (the per-product sums come from llama/tap.py, which owns
the ctypes eval callback)."""
