"""Experiment configs: one module per model family, each with `get_config(arg)` (big_vision style).

Load one with `bitgen.configlib.load_config("bsq_vit:tiny")`.
"""
