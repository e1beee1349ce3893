"""The bottom layer: progress reporting and statistics. Imports nothing else from ``qvlm``."""
