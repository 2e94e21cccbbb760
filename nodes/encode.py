from comfy_api.latest import io

import comfy.samplers
from invadapter_core.encode import encode_reference

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
                        "diffusion features along the way. Several images = several photos of one identity.",
            inputs=[
                io.Model.Input("model", tooltip="The checkpoint's model: the same one you generate with."),
                io.Vae.Input("vae", tooltip="The checkpoint's VAE, to encode the face photo."),
                io.Image.Input("image", tooltip="The face crop (one identity; a batch = several photos of it)."),
                io.Conditioning.Input("caption", tooltip="CLIPTextEncode of a caption describing the face photo."),
                io.Int.Input("steps", default=20, min=2, max=1000,
                             tooltip="Inversion steps. Use the sampler's steps and scheduler to reuse every feature."),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="simple",
                               tooltip="Inversion schedule: the same as the sampler's, so its features are reused."),
                io.Int.Input("resolution", default=512, min=64, max=2048, step=8,
                             tooltip="The face is centre-cropped square and resized to this; a trained adapter "
                                     "requires its own reference resolution."),
                io.Boolean.Input("keep_features", default=True,
                                 tooltip="Keep the features captured during inversion (memory for speed)."),
                InvAdapterType.Input("invadapter", optional=True,
                                     tooltip="Optional: the adapter, so its reference resolution and cross-attention "
                                             "features are honoured."),
            ],
            outputs=[ReferenceType.Output(display_name="reference",
                                          tooltip="The identity: connect to Inv-Adapter Apply or Save Reference."),
                     io.Latent.Output(display_name="inverted_noise",
                                      tooltip="The top of the inverted trajectory (the face as noise), to inspect "
                                              "or reuse.")],
        )

    @classmethod
    def execute(cls, model, vae, image, caption, steps, scheduler, resolution, keep_features,
                invadapter=None) -> io.NodeOutput:
        cross = False
        if invadapter is not None:
            if invadapter.reference_resolution and invadapter.reference_resolution != resolution:
                raise ValueError(f"the Inv-Adapter '{invadapter.name}' was trained on {invadapter.reference_resolution}"
                                 f" px references; set resolution to {invadapter.reference_resolution}")
            cross = invadapter.has_cross
        reference = encode_reference(model, vae, image, caption, steps, scheduler, resolution, keep_features, cross)
        noise = model.model.process_latent_out(reference.inverted.clone())
        return io.NodeOutput(reference, {"samples": noise})


NODES = [InvAdapterEncodeReference]
