from comfy_api.latest import io

import comfy.samplers
from invadapter_core.reference.inversion import CONVENTIONS
from invadapter_core.reference.encode import CAPTURE, DIT_CAPTURE, FEATURE_PRECISION, capture_levels, encode_reference

from .finite import finite_floats
from .types import CATEGORY, InvAdapterType, ReferenceType


class InvAdapterEncodeReference(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InvAdapterEncodeReference",
            display_name="Inv-Adapter Encode Reference",
            category=CATEGORY,
            search_aliases=["encode face", "identity", "face id", "faceid", "likeness", "ddim inversion", "invert",
                            "reference", "instantid", "pulid", "ipadapter", "face swap", "inv-adapter"],
            description="DDIM-inverts the face image(s) with the model and the caption (guidance 1) and keeps the "
                        "diffusion features along the way (Flux, Chroma, Qwen-Image: a flow inversion on the model's "
                        "own schedule, with the caption's FluxGuidance on Flux-dev, else 3.5). Several images = "
                        "several photos of one identity.",
            inputs=[
                io.Model.Input("model", tooltip="The checkpoint's model: the same one you generate with."),
                io.Vae.Input("vae", tooltip="The checkpoint's VAE, to encode the face photo."),
                io.Image.Input("image", tooltip="The face crop (one identity; a batch = several photos of it)."),
                io.Conditioning.Input("caption", tooltip="CLIPTextEncode of a caption describing the face photo."),
                io.Int.Input("steps", default=20, min=2, max=1000,
                             tooltip="Inversion steps. Use the sampler's steps and scheduler to reuse every feature."),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="simple",
                               tooltip="Inversion schedule: the same as the sampler's, so its features are reused."),
                io.Int.Input("resolution", default=0, min=0, max=2048, step=8,
                             tooltip="The face is centre-cropped square and resized to this. 0: the model family's "
                                     "own (1024 for SDXL, 768 for SD2.x v-prediction, else 512; Flux and Chroma "
                                     "512, a quarter of the memory of 1024); a trained adapter requires its own "
                                     "reference resolution."),
                io.Boolean.Input("keep_features", default=True,
                                 tooltip="Keep the features captured during inversion (memory for speed)."),
                InvAdapterType.Input("invadapter", optional=True,
                                     tooltip="Optional: the adapter, so its reference resolution and cross-attention "
                                             "features are honoured."),
                io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES, default="euler", optional=True,
                               tooltip="The sampler you will generate with. Samplers that drop the schedule's "
                                       "penultimate sigma (uni_pc, uni_pc_bh2, dpm_2, dpm_2_ancestral) sample other "
                                       "sigmas than the rest; with the matching schedule every sampler step finds its "
                                       "features already computed."),
                io.Combo.Input("inversion", options=list(CONVENTIONS), default=CONVENTIONS[0], optional=True,
                               tooltip="'lowest sigma': the face latent is taken at the schedule's lowest sigma and "
                                       "each step is evaluated where it starts, so every inversion pass is also a "
                                       "reference pass (features for free). 'classic': the first step starts at "
                                       "sigma 0 and each step is evaluated at its target sigma (diffusers, null-text "
                                       "inversion); its passes give no reusable features."),
                io.Combo.Input("capture", options=list(dict.fromkeys([*CAPTURE, *DIT_CAPTURE])), default="all levels",
                               optional=True,
                               tooltip="Which blocks' features the reference keeps. SD1.x/2.x/SDXL: 'coarse levels' "
                                       "and 'fine levels' keep only those the block-weights presets of the same name "
                                       "use (SDXL at 1024 px: 'coarse' keeps 157 of 210 MB per step). Flux, Chroma, "
                                       "Qwen-Image: 'double blocks' (Flux: 19 of 57 blocks, a third of the memory) "
                                       "or 'early blocks' (the double blocks and the first third of the single "
                                       "ones)."),
                io.Combo.Input("feature_precision", options=list(FEATURE_PRECISION), default="model", optional=True,
                               tooltip="Keep the features in the model's precision, or in 8-bit floats: half the "
                                       "memory, each value rounded by up to 6 %."),
                io.Float.Input("keep_start_percent", default=0.0, min=0.0, max=1.0, step=0.001, optional=True,
                               tooltip="Keep only the steps from here on (set it to Inv-Adapter Apply's "
                                       "start_percent): steps outside the kept window cost one reference pass each "
                                       "when sampling needs them."),
                io.Float.Input("keep_end_percent", default=1.0, min=0.0, max=1.0, step=0.001, optional=True,
                               tooltip="Keep only the steps up to here (set it to Inv-Adapter Apply's end_percent)."),
            ],
            outputs=[ReferenceType.Output(display_name="reference",
                                          tooltip="The identity: connect to Inv-Adapter Apply or Save Reference."),
                     io.Latent.Output(display_name="inverted_noise",
                                      tooltip="The top of the inverted trajectory (the face as noise), to inspect "
                                              "or reuse.")],
        )

    @classmethod
    @finite_floats
    def execute(cls, model, vae, image, caption, steps, scheduler, resolution, keep_features,
                invadapter=None, sampler_name="euler", inversion=CONVENTIONS[0], capture="all levels",
                feature_precision="model", keep_start_percent=0.0, keep_end_percent=1.0) -> io.NodeOutput:
        if keep_start_percent > keep_end_percent:
            raise ValueError(f"keep_start_percent {keep_start_percent} is after keep_end_percent {keep_end_percent}: "
                             f"the kept window must start before it ends")
        cross = False
        if invadapter is not None:
            wanted = invadapter.reference_resolution
            if wanted and resolution and wanted != resolution:
                raise ValueError(f"the Inv-Adapter '{invadapter.name}' was trained on {wanted} px references; set "
                                 f"resolution to {wanted} (or 0)")
            resolution = resolution or wanted or 0
            cross = invadapter.has_cross
        reference = encode_reference(model, vae, image, caption, steps, scheduler, resolution, keep_features, cross,
                                     inversion, capture_levels(model, capture), sampler_name,
                                     FEATURE_PRECISION[feature_precision], (keep_start_percent, keep_end_percent))
        noise = model.model.process_latent_out(reference.inverted.clone())
        return io.NodeOutput(reference, {"samples": noise})


NODES = [InvAdapterEncodeReference]
