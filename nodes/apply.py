from comfy_api.latest import io

from invadapter_core.adapter.application import apply_identity
from invadapter_core.adapter.injection import APPLY_TO, COMBINE_MODES
from invadapter_core.adapter.joint import POSITIONS, ROWS
from invadapter_core.comfyui.notify import collecting

from .finite import finite_floats
from .types import CATEGORY, BlockWeightsType, InvAdapterType, ReferenceType


class InvAdapterApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InvAdapterApply",
            display_name="Inv-Adapter Apply",
            category=CATEGORY,
            search_aliases=["identity", "face id", "faceid", "likeness", "instantid", "pulid", "ipadapter",
                            "face swap", "reference", "character consistency", "same face", "inv-adapter"],
            description="Injects the reference's diffusion features into the model's self- and cross-attention "
                        "through the Embedded Attention Adapter (on Flux, Chroma and Qwen-Image: inside their joint "
                        "attention). "
                        "Chain several for several identities (with masks).",
            inputs=[
                io.Model.Input("model", tooltip="The model to sample with (LoRA and other patches may be on it)."),
                InvAdapterType.Input("invadapter", tooltip="The adapter from Inv-Adapter Loader."),
                ReferenceType.Input("reference",
                                    tooltip="The identity: from Encode Reference, Load Reference or Combine "
                                            "References."),
                io.Float.Input("weight_self", default=1.0, min=-2.0, max=5.0, step=0.05,
                               tooltip="lambda_s: strength of the self-attention EAA (identity detail). On Flux and "
                                       "Chroma: the strength of the EAA in their joint attention."),
                io.Float.Input("weight_cross", default=1.0, min=-2.0, max=5.0, step=0.05,
                               tooltip="lambda_c: strength of the cross-attention EAA. Only adapter files trained with "
                                       "cross-attention layers have one: with 'init from model' this does nothing. "
                                       "MM-DiTs (Flux, Chroma, Qwen-Image) have no cross-attention: there it does "
                                       "nothing."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Where in sampling the adapter starts acting (0 = the first step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Where it stops (1 = the last step); outside the range the model is "
                                       "untouched."),
                io.Combo.Input("combine", options=list(COMBINE_MODES), default="concat",
                               tooltip="Several reference photos: concatenate their tokens, or average them."),
                io.Combo.Input("apply_to", options=list(APPLY_TO), default="cond and uncond",
                               tooltip="'cond only' leaves the negative pass untouched: CFG then amplifies identity."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Confine this identity to a region of the generated image (soft masks ok)."),
                BlockWeightsType.Input("block_weights", optional=True,
                                       tooltip="Per-level strengths from InvAdapterBlockWeights (coarse/fine; on Flux, "
                                               "Chroma and Qwen-Image: 'double only' or the dit_ sliders)."),
                io.Combo.Input("rows", options=list(ROWS), default=ROWS[0], optional=True,
                               tooltip="MM-DiT models only (Flux, Chroma, Qwen-Image; ignored elsewhere): add the "
                                       "identity to the generated image's tokens only ('image', DynaIP's "
                                       "decoupling), or to the prompt's tokens too ('image and text')."),
                io.Combo.Input("reference_positions", options=list(POSITIONS), default="own", optional=True,
                               tooltip="MM-DiT models only (Flux, Chroma, Qwen-Image; ignored elsewhere): where the "
                                       "reference's tokens sit for the rotary positions: on the generated image's "
                                       "own grid ('own'), or shifted off it like a Kontext context image ('shifted')."),
            ],
            outputs=[io.Model.Output(tooltip="The model with the identity applied: connect it to KSampler.")],
        )

    @classmethod
    @finite_floats
    def execute(cls, model, invadapter, reference, weight_self, weight_cross, start_percent, end_percent, combine,
                apply_to, mask=None, block_weights=None, rows=ROWS[0], reference_positions="own") -> io.NodeOutput:
        with collecting() as notices:
            model = apply_identity(model, invadapter, reference, weight_self, weight_cross, start_percent,
                                   end_percent, combine, apply_to, mask, block_weights, rows, reference_positions)
        return io.NodeOutput(model, ui={"text": notices} if notices else None)


NODES = [InvAdapterApply]
