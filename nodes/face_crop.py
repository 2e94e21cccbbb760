"""InvAdapterFaceCrop: one square face crop per image of a batch (the reference image's first step).

The logic lives in ``invadapter_core.face.detect``; this node only maps widgets to it, registers the "insightface" model
folder (``models/insightface``, plus any ``insightface:`` entry of extra_model_paths.yaml) and reports progress.
"""
import json
import os

from comfy_api.latest import io

import comfy.model_management
import comfy.utils
import folder_paths
from invadapter_core.comfyui.notify import collecting, notify
from invadapter_core.face import detect as face_core
from invadapter_core.files.images import truncated_image_file

from .finite import finite_floats

INSIGHTFACE_FOLDER = "insightface"
# Nodes whose "image" widget names a file in ComfyUI's input (or, annotated, output) folder.
IMAGE_FILE_LOADERS = ("LoadImage", "LoadImageMask", "LoadImageOutput")
# The custom type's value: a tuple of dicts, one per source image (see the `boxes_json` output for the fields).
FaceBoxesType = io.Custom("INVADAPTER_FACE_BOXES")


def register_insightface_folder() -> None:
    # Appended (is_default=False): folders that extra_model_paths.yaml or another pack registered stay first.
    folder_paths.add_model_folder_path(INSIGHTFACE_FOLDER, os.path.join(folder_paths.models_dir, "insightface"))


register_insightface_folder()


class InvAdapterFaceCrop(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InvAdapterFaceCrop",
            display_name="Inv-Adapter Face Crop",
            category="InvAdapter",
            search_aliases=["face crop", "face detect", "crop face", "insightface", "mtcnn", "face", "identity",
                            "face id", "face swap", "inv-adapter"],
            description="Finds a face in each image of the batch and cuts a square around it (box side times "
                        "1 + 2 x margin), resized to the adapter's reference resolution. Detectors: InsightFace "
                        "(antelopev2 / buffalo_l in models/insightface/models/<name>/, optional) or the built-in "
                        "MTCNN (weights from the facenet-pytorch package). Also outputs each face's box as a mask on "
                        "its source image and the boxes as data / JSON.",
            inputs=[
                io.Image.Input("image", tooltip="Photo(s) with a face: each image of the batch gives one crop."),
                io.Combo.Input("detector", options=list(face_core.DETECTORS), default="auto",
                               tooltip="auto: InsightFace when the insightface package and the chosen model pack are "
                                       "installed, otherwise MTCNN (always available)."),
                io.Combo.Input("insightface_model", options=list(face_core.INSIGHTFACE_MODELS), default="antelopev2",
                               tooltip="InsightFace model pack, in models/insightface/models/<name>/*.onnx."),
                io.Combo.Input("device", options=["cpu", "gpu"], default="cpu",
                               tooltip="gpu: ComfyUI's torch device for MTCNN, the CUDA provider for InsightFace."),
                io.Combo.Input("face", options=list(face_core.SELECT_MODES), default="largest",
                               tooltip="Which face to crop when an image has several."),
                io.Int.Input("face_index", default=0, min=0, max=255,
                             tooltip="With face = index: 0 is the leftmost face (by box centre)."),
                io.Float.Input("margin", default=0.5, min=0.0, max=4.0, step=0.05,
                               tooltip="Added on each side, as a fraction of the face box's longer side: the crop "
                                       "square's side is box x (1 + 2 x margin), kept inside the image."),
                io.Int.Input("min_face_size", default=40, min=12, max=8192,
                             tooltip="Faces whose box is smaller than this (longer side, source pixels) are ignored."),
                io.Int.Input("size", default=512, min=64, max=4096, step=8,
                             tooltip="Side of the output crops (512 = the adapter's reference resolution)."),
                io.Combo.Input("on_no_face", options=list(face_core.ON_NO_FACE), default="error",
                               tooltip="error: stop and list the batch indices without a face. center crop: keep "
                                       "every image, the centre square for those (a warning). skip: leave them out "
                                       "of the crops (the mask and boxes still cover every image)."),
            ],
            outputs=[
                io.Image.Output(display_name="crops",
                                tooltip="One square face crop per image: connect to Encode Reference's image."),
                io.Mask.Output(display_name="face_mask", tooltip="Each face's box as a mask on its source image."),
                FaceBoxesType.Output(display_name="boxes", tooltip="The face boxes as data, one per source image."),
                io.String.Output(display_name="boxes_json",
                                 tooltip="The same boxes as JSON text (box, score, crop square, detector)."),
            ],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
        )

    @classmethod
    @finite_floats
    def execute(cls, image, detector, insightface_model, device, face, face_index, margin, min_face_size, size,
                on_no_face) -> io.NodeOutput:
        torch_device = comfy.model_management.get_torch_device() if device == "gpu" else "cpu"
        det = face_core.get_detector(detector, insightface_roots=folder_paths.get_folder_paths(INSIGHTFACE_FOLDER),
                                 insightface_model=insightface_model, device=torch_device)
        total = image.shape[0] if getattr(image, "ndim", 0) == 4 else 1
        pbar = comfy.utils.ProgressBar(total)
        with collecting() as notices:
            tell_truncated_sources(getattr(cls, "hidden", None))
            result = face_core.crop_faces(
                image, det, size=size, margin=margin, select=face, index=face_index, min_face_size=min_face_size,
                on_no_face=on_no_face,
                before_image=lambda i: comfy.model_management.throw_exception_if_processing_interrupted(),
                after_image=lambda i: pbar.update(1),
            )
        records = tuple(result.records)
        return io.NodeOutput(result.crops, result.masks, records, json.dumps(list(records), indent=1),
                             ui={"text": notices} if notices else None)


def source_image_files(prompt: dict, node_id: str) -> list[str]:
    """The image files loaded upstream of ``node_id``'s image input (by LoadImage and its kin), from the prompt."""
    link = prompt.get(str(node_id), {}).get("inputs", {}).get("image")
    stack, seen, files = [link[0]] if isinstance(link, list) and link else [], set(), []
    while stack:
        key = str(stack.pop())
        if key in seen or key not in prompt:
            continue
        seen.add(key)
        node = prompt[key]
        inputs = node.get("inputs", {})
        if node.get("class_type") in IMAGE_FILE_LOADERS and isinstance(inputs.get("image"), str):
            files.append(inputs["image"])
            continue
        stack += [v[0] for v in inputs.values() if isinstance(v, list) and len(v) == 2 and isinstance(v[1], int)]
    return files


def tell_truncated_sources(hidden) -> None:
    """A crop of a partly decoded file is cut off or black where the data ended: say so. The IMAGE tensor does
    not know where it came from, so the prompt is followed back to the loader's file, which is decoded again with
    truncated data refused (exact: a photo with a black border is not mistaken for one)."""
    prompt, node_id = getattr(hidden, "prompt", None), getattr(hidden, "unique_id", None)
    if not isinstance(prompt, dict) or node_id is None:
        return
    for name in source_image_files(prompt, node_id):
        try:
            path = folder_paths.get_annotated_filepath(name)
        except Exception:  # noqa: BLE001 - a name the loader itself rejects: it has reported it already
            continue
        why = truncated_image_file(path)
        if why is not None:
            notify(f"the image file '{name}' is incomplete ({why}): ComfyUI's loader decoded only part of it and "
                   f"filled the rest with black, so the face crop may be cut off or black; upload the complete file")


NODES = [InvAdapterFaceCrop]
