"""Reference stage: invert a face with the user's checkpoint, capture its diffusion features, keep them (the
Reference, its feature cache and its files)."""
