"""Data for vislib's bundled models: the synthetic shapes dataset and its training script.

* :mod:`vislib.data.shapes`: the deterministic generator (``make_sample``, ``make_multi_instance``,
  ``materialise``, ...).
* :mod:`vislib.data.train`: ``python -m vislib.data.train --model shapes_resnet`` retrains a
  bundled model and writes its weights and model card to ``assets/models/``.
"""
