"""Fast finetune: learned weight rounding (AdaRound) or weights (AdaQuant), layer by layer.

options.py holds the typed options (imported by pyquant.config, so it imports nothing of
pyquant's), gram.py turns a layer's inputs into the Gram matrices of its squared output
error, finetune.py runs the passes over the calibration data and the C++ fitting loop.
"""
