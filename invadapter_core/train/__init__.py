"""The Inv-Adapter trainer: ``python -m invadapter_core.train --help`` (docs/training.md).

Modules: config (the config file), data (items, shards, sample order), preprocess (crop, encode, invert ->
shards), model (frozen base + trainable InvAdapter), step (what one training step computes: timesteps, references,
the two passes, the loss terms), identity (the identity loss's recognizer: VAE decode + ArcFace), loop (the run:
optimizer, checkpoints, validation, logging), checkpoint, validate (sample images), distributed (torchrun/DDP).
ComfyUI is found by ``comfyui.host``. Importing this package does not import ComfyUI.
"""
