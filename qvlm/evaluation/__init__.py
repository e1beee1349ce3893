"""Consumers of a quantized model: they measure it and never change it.

* :mod:`~qvlm.evaluation.accuracy`  accuracy per question type on a task (``evaluate``);
* :mod:`~qvlm.evaluation.bench`     the quantize -> evaluate loop over recipes and bit settings, McNemar tests;
* :mod:`~qvlm.evaluation.reference` the bitsandbytes NF4 reference row (transformers' own 4-bit path);
* :mod:`~qvlm.evaluation.analysis`  DED and the layer-dependency diagnostics (Eqs. 4-7 read back);
* :mod:`~qvlm.evaluation.compare`   token-level FP-vs-quantized comparison, disagreement finder, bit sweep;
* :mod:`~qvlm.evaluation.modality`  image vs text token statistics at each decoder layer's input.
"""
