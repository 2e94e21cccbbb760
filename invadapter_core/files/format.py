"""The file format's constants, defined once: its version, the metadata prefix and the recorded vocabularies."""
FORMAT_VERSION = 1
META = "invadapter."  # prefix of every metadata key the pack writes
# how a reference's trajectory was inverted (written as metadata "invadapter.convention"; see reference.inversion)
INVERSION_CONVENTIONS = ("lowest sigma", "classic")
