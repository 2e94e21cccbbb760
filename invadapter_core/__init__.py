"""Inv-Adapter as plain torch, in packages named after the method's stages: ``face`` -> ``reference`` -> ``adapter``
(-> the sampler), over ``arch`` (what the pack knows of a network), ``files`` (formats and validation) and
``comfyui`` (memory-manager glue, the host, notices). ``train`` and ``evaluate`` build on them and on nothing else.
"""
