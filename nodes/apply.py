from comfy_api.latest import io

from invadapter_core.comfy_model import (APPLY_TO, COMBINE_MODES, Application, block_dims, check_family, install,
                                         model_family, transformer_blocks, warn_if_features_from_another_model)
from invadapter_core.weights import check_adapter_fits

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
                        "through the Embedded Attention Adapter. Chain several for several identities (with masks).",
            inputs=[
                io.Model.Input("model", tooltip="The model to sample with (LoRA and other patches may be on it)."),
                InvAdapterType.Input("invadapter", tooltip="The adapter from Inv-Adapter Loader."),
                ReferenceType.Input("reference",
                                    tooltip="The identity: from Encode Reference, Load Reference or Combine "
                                            "References."),
                io.Float.Input("weight_self", default=1.0, min=-2.0, max=5.0, step=0.05,
                               tooltip="lambda_s: strength of the self-attention EAA (identity detail)."),
                io.Float.Input("weight_cross", default=1.0, min=-2.0, max=5.0, step=0.05,
                               tooltip="lambda_c: strength of the cross-attention EAA (needs trained weights)."),
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
                                       tooltip="Per-level strengths from InvAdapterBlockWeights (coarse/fine)."),
            ],
            outputs=[io.Model.Output(tooltip="The model with the identity applied: connect it to KSampler.")],
        )

    @classmethod
    def execute(cls, model, invadapter, reference, weight_self, weight_cross, start_percent, end_percent, combine,
                apply_to, mask=None, block_weights=None) -> io.NodeOutput:
        check_family(model, reference)
        warn_if_features_from_another_model(model, reference)
        blocks = transformer_blocks(model)
        check_adapter_fits(invadapter, model_family(model), block_dims(blocks))
        if weight_self == 0 and weight_cross == 0:
            return io.NodeOutput(model.clone())
        if start_percent > end_percent:
            raise ValueError(f"start_percent ({start_percent}) is after end_percent ({end_percent})")
        ms = model.get_model_object("model_sampling")
        app = Application(invadapter, reference, blocks, weight_self, weight_cross,
                          sigma_start=ms.percent_to_sigma(start_percent), sigma_end=ms.percent_to_sigma(end_percent),
                          combine=combine, apply_to=apply_to, mask=mask, block_weights=block_weights)
        return io.NodeOutput(install(model, app))


NODES = [InvAdapterApply]
