"""The Inv-Adapter trainer: ``python -m invadapter_core.train --help`` (docs/training.md).

Modules: config (the config file), bootstrap (ComfyUI on sys.path), data (items, shards, sample order),
preprocess (crop, encode, invert -> shards), model (frozen base + trainable InvAdapter), loop (the training step),
checkpoint, validate (sample images), distributed (torchrun/DDP). Importing this package does not import ComfyUI.
"""
