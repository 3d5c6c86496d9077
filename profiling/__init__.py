"""Expert saliency from calibration text (frequency, REAP, EAFT-REAP) with transformers.

Needs the ``torch`` extra. See :func:`profiling.profile.profile_model`.
"""
