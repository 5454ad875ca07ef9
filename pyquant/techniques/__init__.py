"""Accuracy techniques, one module each: each says what statistics it needs, then applies
itself to the model."""
