"""Fast finetune: learned weight rounding (AdaRound) or weights (AdaQuant), layer by layer.

gram.py turns a layer's inputs into the Gram matrices of its squared output error,
finetune.py runs the pass over the calibration data and the C++ fitting loop; the
options are pyquant.config.FastFinetuneOptions.
"""
