"""Tools that build the bundled models (``python -m training``); not part of the runtime package ``qvlm``."""
