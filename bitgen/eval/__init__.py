"""Evaluation of tokenizers: reconstruction quality, code statistics, baselines."""
