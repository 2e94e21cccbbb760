"""Inv-Adapter, in packages named after the method's stages: ``face`` -> ``reference`` -> ``adapter`` (-> the
sampler), over ``arch`` (what the pack knows of a network), ``files`` (formats and validation) and ``comfyui``
(memory-manager glue, the host, notices). ``train`` and ``evaluate`` build on them and on nothing else.

Plain torch, runnable outside ComfyUI: the EAA layers and attention (``adapter.eaa``), the inversion in sigma space
(``reference.inversion``), block levels (``arch.levels``), the file formats (``files``). What runs a ComfyUI model
talks to ComfyUI: at import ``reference.encode``, ``adapter.application`` and ``adapter.joint``; inside functions
(only when a model or a tool needs it) ``arch``, ``comfyui.memory`` (the memory manager), ``comfyui.host``,
``files.images.load_image_file``, ``train`` and ``evaluate``.
"""
