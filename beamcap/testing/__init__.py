"""Offline test helpers: tiny random-weight models of each image-to-text family.

    from beamcap.testing.models import BUILDERS
    folder = BUILDERS["llava"]("/tmp/tiny-llava")   # save_pretrained folder, loads like a hub model

Useful to test a pipeline that uses CaptionImages without downloading a model.
Captions from random weights are noise: check formats and counts, not words.
"""
