"""The generators of bench/render_docs.py, one module per page: each function takes the
``Results`` of a repository root and returns the text between one pair of markers."""
