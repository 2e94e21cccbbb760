"""Nodes that shape how references act: several photos of one identity, per-level strengths."""
from comfy_api.latest import io

from invadapter_core.adapter.block_weights import BlockWeights
from invadapter_core.arch.levels import DIT_LEVELS, DIT_PRESETS, LEVELS, PRESETS
from invadapter_core.reference.reference import combine_references

from .finite import finite_floats
from .types import CATEGORY, BlockWeightsType, ReferenceType


class InvAdapterCombineReferences(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InvAdapterCombineReferences",
            display_name="Inv-Adapter Combine References",
            category=CATEGORY,
            search_aliases=["combine references", "multiple photos", "several photos", "merge identity",
                            "average faces", "identity", "inv-adapter"],
            description="Several encoded photos of the same person as one reference; InvAdapterApply's 'combine' "
                        "chooses how their features mix (token concat or average).",
            inputs=[ReferenceType.Input("reference_1", tooltip="A reference of the person."),
                    ReferenceType.Input("reference_2", tooltip="Another photo of the same person, encoded the "
                                                               "same way (model, resolution, steps)."),
                    ReferenceType.Input("reference_3", optional=True, tooltip="Optional third photo."),
                    ReferenceType.Input("reference_4", optional=True, tooltip="Optional fourth photo.")],
            outputs=[ReferenceType.Output(display_name="reference",
                                          tooltip="One reference holding every photo: connect to Inv-Adapter "
                                                  "Apply.")],
        )

    @classmethod
    def execute(cls, reference_1, reference_2, reference_3=None, reference_4=None) -> io.NodeOutput:
        refs = [r for r in (reference_1, reference_2, reference_3, reference_4) if r is not None]
        return io.NodeOutput(combine_references(refs))


class InvAdapterBlockWeights(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        level_inputs = []
        for kind in ("self", "cross"):
            for level in LEVELS:
                level_inputs.append(io.Float.Input(f"{kind}_{level}", default=1.0, min=-2.0, max=5.0, step=0.05,
                                                   tooltip=f"{kind}-attention EAA strength at {level} "
                                                           f"(used when preset is 'custom')"))
        dit_inputs = [io.Float.Input(f"dit_{level}", default=1.0, min=-2.0, max=5.0, step=0.05, optional=True,
                                     tooltip=f"MM-DiT models only (Flux, Chroma, Qwen-Image): EAA strength in the "
                                             f"{level.replace('_', ' stream, ')} blocks (used when preset is 'custom')")
                      for level in DIT_LEVELS]
        return io.Schema(
            node_id="InvAdapterBlockWeights",
            display_name="Inv-Adapter Block Weights",
            category=CATEGORY,
            search_aliases=["block weights", "coarse", "fine", "layer weights", "unet levels", "identity strength",
                            "inv-adapter"],
            description="Per-level strengths. 'coarse' keeps the low-resolution blocks (face shape, layout), "
                        "'fine' the high-resolution blocks (texture, skin, eyes); 'custom' uses the sliders. On "
                        "Flux and Chroma the levels are the double- and single-stream blocks by depth (dit_ sliders); "
                        "Qwen-Image has double-stream blocks only.",
            inputs=[io.Combo.Input("preset", options=list(dict.fromkeys([*PRESETS, *DIT_PRESETS])) + ["custom"],
                                   default="all",
                                   tooltip="all: every level at 1. coarse: face shape and layout. fine: texture, "
                                           "skin, eyes. double only (Flux, Chroma): the double-stream blocks only "
                                           "(on Qwen-Image, all of them: it has no others). "
                                           "custom: the sliders below.")] + level_inputs + dit_inputs,
            outputs=[BlockWeightsType.Output(display_name="block_weights",
                                             tooltip="Connect to Inv-Adapter Apply's block_weights."),
                     io.String.Output(display_name="summary", tooltip="The strengths per level, as text.")],
        )

    @classmethod
    @finite_floats
    def execute(cls, preset, **levels) -> io.NodeOutput:
        if preset == "custom":
            dit = {lv: levels.get(f"dit_{lv}", 1.0) for lv in DIT_LEVELS}
            weights = BlockWeights({**{lv: levels[f"self_{lv}"] for lv in LEVELS}, **dit},
                                   {lv: levels[f"cross_{lv}"] for lv in LEVELS})
        else:
            weights = BlockWeights.preset(preset)
        return io.NodeOutput(weights, weights.describe())


NODES = [InvAdapterCombineReferences, InvAdapterBlockWeights]
