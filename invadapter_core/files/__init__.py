"""Files: safetensors I/O, validation of adapter and reference files, images and data manifests."""
