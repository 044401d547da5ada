"""Recipes: one module per architecture of the paper (METHOD.md section 7)."""
