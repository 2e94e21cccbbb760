from comfy_api.latest import io

from invadapter_core.adapter.identity_prompt import PLACEHOLDER, identity_conditioning

from .types import CATEGORY, InvAdapterType, ReferenceType


class InvAdapterIdentityPrompt(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InvAdapterIdentityPrompt",
            display_name="Inv-Adapter Identity Prompt",
            category=CATEGORY,
            search_aliases=["identity token", "identity prompt", "textual inversion", "face id", "identity",
                            "likeness", "idadapter", "text encode", "inv-adapter"],
            description="Encodes a prompt with the adapter's identity token: the word 'sks' (or your placeholder) "
                        "becomes token embeddings read from the reference, entering CLIP as textual-inversion "
                        "embeddings do (IDAdapter's textual injection). Needs weights trained with an identity "
                        "token; use it as KSampler's positive, with Inv-Adapter Apply on the model.",
            inputs=[
                io.Model.Input("model", tooltip="The checkpoint's model: it reads the reference's features."),
                io.Clip.Input("clip", tooltip="The checkpoint's CLIP (SD1.x or SD2.x)."),
                InvAdapterType.Input("invadapter",
                                     tooltip="Weights from Inv-Adapter Loader trained with an identity token."),
                ReferenceType.Input("reference", tooltip="The identity: from Encode Reference, Load Reference or "
                                                         "Combine References (several photos are averaged)."),
                io.String.Input("text", multiline=True, default=f"a photo of {PLACEHOLDER} person",
                                tooltip=f"The prompt; write the placeholder word ('{PLACEHOLDER}') where the person "
                                        f"goes."),
                io.String.Input("placeholder", default=PLACEHOLDER, optional=True,
                                tooltip="The word in the text that the identity token replaces (one word)."),
            ],
            outputs=[io.Conditioning.Output(tooltip="The prompt with the identity token: KSampler's positive.")],
        )

    @classmethod
    def execute(cls, model, clip, invadapter, reference, text, placeholder=PLACEHOLDER) -> io.NodeOutput:
        return io.NodeOutput(identity_conditioning(model, clip, invadapter, reference, text, placeholder))


NODES = [InvAdapterIdentityPrompt]
