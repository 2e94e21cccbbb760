"""The file format's constants, defined once: its version, the metadata prefix and the recorded vocabularies."""
FORMAT_VERSION = 1
META = "invadapter."  # prefix of every metadata key the pack writes
# how a reference's trajectory was inverted (written as metadata "invadapter.convention"; see reference.inversion)
INVERSION_CONVENTIONS = ("lowest sigma", "classic")
# which network an adapter's tensors are for (metadata "invadapter.architecture", the name of the layout: a UNet's
# self.* maps the block's attention input, an MM-DiT's (Flux, QwenImage) the joint attention's K and V); files
# without it are UNet files, written before MM-DiTs could be trained
DEFAULT_ARCHITECTURE = "UNet"
