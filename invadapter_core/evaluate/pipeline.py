"""Generation for the evaluation, through the node classes a graph would use (the stable API), never the pack's
internals: the pack's V3 nodes by node id (``execute``) and ComfyUI's own V1 nodes by NODE_CLASS_MAPPINGS
(``FUNCTION``), with every widget value passed explicitly, as ComfyUI passes them.

Files given as paths are made visible to the loader nodes by adding their folder to ComfyUI's model folder
(``folder_paths.add_model_folder_path``); names are looked up in ComfyUI's models folders as the nodes do.
Needs ComfyUI set up first (``invadapter_core.comfyui.host.setup_comfy``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..adapter.weights import INIT_FROM_MODEL

BLOCK_PRESET_NONE = "none"
BLOCK_LEVEL_DEFAULT = 1.0  # the sliders' value; only read by the node when its preset is "custom"


class PipelineError(ValueError):
    pass


@dataclass(frozen=True)
class Config:
    """One point of the settings grid."""
    adapter: str
    weight_self: float
    weight_cross: float
    block_weights: str  # a preset of InvAdapterBlockWeights, or "none" (no per-level weights)

    @property
    def name(self) -> str:
        return f"{self.adapter}|ws={self.weight_self:g}|wc={self.weight_cross:g}|bw={self.block_weights}"


def model_name(folder: str, value: str, what: str) -> str:
    """A file path or a name in ComfyUI's ``folder`` -> the name the loader node takes."""
    import folder_paths

    if os.path.isfile(value):
        path = os.path.abspath(value)
        folder_paths.add_model_folder_path(folder, os.path.dirname(path), is_default=True)
        name = os.path.basename(path)
        found = folder_paths.get_full_path(folder, name)
        if found is None or os.path.abspath(found) != path:
            raise PipelineError(f"{what} {path}: another file named {name} shadows it in ComfyUI's '{folder}' "
                                f"folders ({found}); rename one of them")
        return name
    if folder_paths.get_full_path(folder, value) is not None:
        return value
    raise PipelineError(f"{what} '{value}' is neither a file nor a file in ComfyUI's '{folder}' folders (searched: "
                        f"{', '.join(folder_paths.get_folder_paths(folder))})")


class Nodes:
    """Calls nodes by id as the executor would."""

    def __init__(self):
        import nodes as comfy_nodes  # ComfyUI's top-level module (use_comfyui put ComfyUI first on sys.path)
        from comfy_api.latest import io

        from ..comfyui.host import load_pack

        self._io = io
        self.comfy = comfy_nodes.NODE_CLASS_MAPPINGS
        self.pack = {cls.define_schema().node_id: cls for cls in load_pack().nodes.all_nodes()}

    def check(self, node_id: str, **values) -> None:
        """Every widget of the node given (optional ones too: the front end sends them all), and every choice among
        the node's options, as ComfyUI's prompt validation checks them."""
        inputs = {i.id: i for i in self.pack[node_id].define_schema().inputs}
        missing = [k for k, i in inputs.items() if isinstance(i, self._io.WidgetInput) and k not in values]
        if missing:  # the node gained a widget: say so rather than silently take a default
            raise PipelineError(f"the evaluation passes no value for {node_id} input(s) {', '.join(missing)}: "
                                f"update invadapter_core/evaluate/pipeline.py for the new node version")
        for key, value in values.items():
            options = getattr(inputs.get(key), "options", None)
            if options is not None and value not in options:
                raise PipelineError(f"{node_id} {key} '{value}' is not one of: {', '.join(map(str, options))}")

    def check_comfy(self, node_id: str, **values) -> None:
        """Choices of one of ComfyUI's own nodes checked against its INPUT_TYPES lists."""
        spec = self.comfy[node_id].INPUT_TYPES()["required"]
        for key, value in values.items():
            options = spec[key][0]
            if isinstance(options, list) and value not in options:
                raise PipelineError(f"{node_id} {key} '{value}' is not one of: {', '.join(map(str, options))}")

    def pack_node(self, node_id: str, **values) -> tuple:
        self.check(node_id, **values)
        return self.pack[node_id].execute(**values).args

    def comfy_node(self, node_id: str, **values) -> tuple:
        cls = self.comfy[node_id]
        return getattr(cls(), cls.FUNCTION)(**values)


@dataclass
class Settings:
    """Everything but the grid; each field is one widget value of a node below."""
    steps: int = 20
    cfg: float = 7.0
    sampler: str = "euler"
    scheduler: str = "simple"
    width: int = 512
    height: int = 512
    negative: str = ""
    resolution: int = 0       # 0: the model family's own
    keep_features: bool = True
    inversion: str = "lowest sigma"
    capture: str = "all levels"
    feature_precision: str = "model"
    start_percent: float = 0.0
    end_percent: float = 1.0
    combine: str = "concat"
    apply_to: str = "cond and uncond"
    detector: str = "auto"
    insightface_model: str = "antelopev2"
    margin: float = 0.5
    min_face_size: int = 40   # the face crop's (the node's default)
    face_device: str = "cpu"  # the face crop's device widget (its default)
    on_no_face: str = "skip"  # a reference photo without a face: "skip" the identity, or "center crop"


CROP_SIZE_FAMILY_DEFAULT = 1024  # the face crop's size when the reference resolution is the family's own (0)


class Generator:
    """A checkpoint loaded once; references encoded once per (identity, adapter); one image per call."""

    def __init__(self, nodes: Nodes, checkpoint: str, settings: Settings):
        self.nodes = nodes
        self.settings = settings
        self.model, self.clip, self.vae = nodes.comfy_node("CheckpointLoaderSimple", ckpt_name=checkpoint)[:3]
        self._adapters: dict[str, object] = {}
        self._text: dict[str, object] = {}

    @staticmethod
    def validate(nodes: Nodes, s: Settings) -> None:
        """Every widget value the settings give, checked before any model is loaded."""
        nodes.check_comfy("KSampler", sampler_name=s.sampler, scheduler=s.scheduler)
        nodes.check("InvAdapterFaceCrop", **Generator._crop_widgets(s))
        nodes.check("InvAdapterEncodeReference", **Generator._encode_widgets(s))
        nodes.check("InvAdapterApply", **Generator._apply_widgets(s, Config(INIT_FROM_MODEL, 1.0, 1.0, "none")))

    @staticmethod
    def _crop_widgets(s: Settings) -> dict:
        return dict(detector=s.detector, insightface_model=s.insightface_model, device=s.face_device,
                    face="largest", face_index=0, margin=s.margin, min_face_size=s.min_face_size,
                    size=s.resolution or CROP_SIZE_FAMILY_DEFAULT,
                    on_no_face="error" if s.on_no_face == "skip" else s.on_no_face)

    @staticmethod
    def _encode_widgets(s: Settings) -> dict:
        return dict(steps=s.steps, scheduler=s.scheduler, resolution=s.resolution, keep_features=s.keep_features,
                    sampler_name=s.sampler, inversion=s.inversion, capture=s.capture,
                    feature_precision=s.feature_precision, keep_start_percent=0.0, keep_end_percent=1.0)

    @staticmethod
    def _apply_widgets(s: Settings, config: Config) -> dict:
        return dict(weight_self=config.weight_self, weight_cross=config.weight_cross, start_percent=s.start_percent,
                    end_percent=s.end_percent, combine=s.combine, apply_to=s.apply_to, rows="image",
                    reference_positions="own")

    def text(self, prompt: str):
        if prompt not in self._text:
            self._text[prompt] = self.nodes.comfy_node("CLIPTextEncode", clip=self.clip, text=prompt)[0]
        return self._text[prompt]

    def adapter(self, name: str):
        if name not in self._adapters:
            self._adapters[name] = self.nodes.pack_node("InvAdapterLoader", adapter_name=name)[0]
        return self._adapters[name]

    def face_crop(self, photo: torch.Tensor) -> torch.Tensor:
        return self.nodes.pack_node("InvAdapterFaceCrop", image=photo, **self._crop_widgets(self.settings))[0]

    def encode(self, crop: torch.Tensor, caption: str, adapter: str):
        return self.nodes.pack_node(
            "InvAdapterEncodeReference", model=self.model, vae=self.vae, image=crop, caption=self.text(caption),
            invadapter=self.adapter(adapter), **self._encode_widgets(self.settings))[0]

    def apply(self, reference, config: Config):
        block_weights = None
        if config.block_weights != BLOCK_PRESET_NONE:
            schema = self.nodes.pack["InvAdapterBlockWeights"].define_schema()
            levels = {i.id: BLOCK_LEVEL_DEFAULT for i in schema.inputs if i.id.startswith(("self_", "cross_"))}
            block_weights = self.nodes.pack_node("InvAdapterBlockWeights", preset=config.block_weights, **levels)[0]
        return self.nodes.pack_node(
            "InvAdapterApply", model=self.model, invadapter=self.adapter(config.adapter), reference=reference,
            block_weights=block_weights, **self._apply_widgets(self.settings, config))[0]

    def generate(self, model, prompt: str, seed: int) -> torch.Tensor:
        """One image [1, H, W, 3]."""
        s = self.settings
        latent = self.nodes.comfy_node("EmptyLatentImage", width=s.width, height=s.height, batch_size=1)[0]
        samples = self.nodes.comfy_node(
            "KSampler", model=model, seed=seed, steps=s.steps, cfg=s.cfg, sampler_name=s.sampler,
            scheduler=s.scheduler, positive=self.text(prompt), negative=self.text(s.negative),
            latent_image=latent, denoise=1.0)[0]
        return self.nodes.comfy_node("VAEDecode", vae=self.vae, samples=samples)[0]
