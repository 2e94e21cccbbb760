"""InvAdapterFaceSimilarity (how much each generated image looks like the reference person) and InvAdapterSelectBest
(the top-k of a batch by that score, for best-of-N generation).

The logic lives in ``invadapter_core.face.recognize`` (recognizers, scores; the scales are explained there) and
``invadapter_core.face.overlay``; the InsightFace model folder is the face crop's.
"""
import json

import torch
from comfy_api.latest import io

import comfy.model_management
import comfy.utils
import folder_paths
from invadapter_core.face import detect as face_core
from invadapter_core.face import recognize as face_id
from invadapter_core.face import scores as face_scores
from invadapter_core.comfyui.notify import collecting
from invadapter_core.face.overlay import draw_scores

from .face_crop import INSIGHTFACE_FOLDER
from .types import CATEGORY

# The custom type's value: an invadapter_core.face.scores.FaceScores (per-image similarity, raw numbers, faces).
FaceScoresType = io.Custom("INVADAPTER_FACE_SCORES")

SCALES_TOOLTIP = ("dlib: 1 - distance/1.2 (0..1), 0.5 = dlib's same-person threshold (distance 0.6). "
                  "InsightFace ArcFace: the cosine of the embeddings (-1..1), the paper's FACE-SIM. NaN = no face.")


class InvAdapterFaceSimilarity(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InvAdapterFaceSimilarity",
            display_name="Inv-Adapter Face Similarity",
            category=CATEGORY,
            search_aliases=["face similarity", "face id", "identity", "likeness", "score", "face score",
                            "face sim", "arcface", "dlib", "compare faces", "resemblance"],
            description="Scores how much each image of a batch looks like the person in the reference photo(s), "
                        "with a face-recognition network: InsightFace ArcFace (antelopev2 / buffalo_l, optional) or "
                        "dlib's ResNet (pip install dlib-bin face-recognition-models). Outputs one similarity per "
                        "image, a text summary, the images with their score drawn on them, and the scores for "
                        "Inv-Adapter Select Best. Images without a face get NaN and 'no face', never an error.",
            inputs=[
                io.Image.Input("reference", tooltip="Photo(s) of the person (a batch = several photos of one "
                                                    "person; photos without a face are left out, with a warning)."),
                io.Image.Input("images", tooltip="The images to score, e.g. a generated batch."),
                io.Combo.Input("recognizer", options=list(face_id.RECOGNIZERS), default="auto",
                               tooltip="auto: InsightFace ArcFace when the insightface package and the chosen model "
                                       "pack (with its recognition model) are installed, otherwise dlib."),
                io.Combo.Input("insightface_model", options=list(face_core.INSIGHTFACE_MODELS), default="antelopev2",
                               tooltip="InsightFace model pack in models/insightface/models/<name>/: antelopev2 "
                                       "(glintr100.onnx) or buffalo_l (w600k_r50.onnx)."),
                io.Combo.Input("device", options=["cpu", "gpu"], default="cpu",
                               tooltip="gpu: ComfyUI's torch device for face detection, the CUDA provider for "
                                       "InsightFace. dlib itself always runs on the CPU."),
                io.Combo.Input("combine", options=list(face_scores.COMBINE), default="mean",
                               tooltip="With several reference photos: the mean of the similarities to each, or "
                                       "the best match (max)."),
                io.Int.Input("min_face_size", default=face_id.MIN_FACE_SIZE, min=12, max=8192,
                             tooltip="Faces smaller than this (longer box side, pixels) are ignored."),
            ],
            outputs=[
                io.Float.Output(display_name="similarity", is_output_list=True,
                                tooltip="One similarity per image, in batch order. " + SCALES_TOOLTIP),
                io.String.Output(display_name="summary",
                                 tooltip="The recognizer and its scale, each image's score with the raw number "
                                         "(dlib distance / ArcFace cosine), the best image and the faceless ones."),
                io.Image.Output(display_name="overlay",
                                tooltip="The images with their score written on them and the scored face boxed "
                                        "(green/red: same/different person by dlib's threshold; yellow: ArcFace, "
                                        "no threshold; grey: no face)."),
                FaceScoresType.Output(display_name="scores",
                                      tooltip="The scores, for Inv-Adapter Select Best."),
                io.String.Output(display_name="scores_json",
                                 tooltip="Per image as JSON: similarity, raw number, face found, verdict, the "
                                         "similarity to each reference, the face box (null where no face)."),
            ],
        )

    @classmethod
    def execute(cls, reference, images, recognizer, insightface_model, device, combine,
                min_face_size) -> io.NodeOutput:
        torch_device = comfy.model_management.get_torch_device() if device == "gpu" else torch.device("cpu")
        total = images.shape[0] if getattr(images, "ndim", 0) == 4 else 1
        pbar = comfy.utils.ProgressBar(total)
        with collecting() as notices:
            managed = face_id.get_recognizer(recognizer, insightface_model=insightface_model, device=torch_device,
                                             insightface_roots=folder_paths.get_folder_paths(INSIGHTFACE_FOLDER))
            scores = face_scores.score_batch(
                managed.get(), reference, images, combine=combine, min_face_size=min_face_size,
                before_image=lambda i: comfy.model_management.throw_exception_if_processing_interrupted(),
                after_image=lambda i: pbar.update(1))
        overlay = draw_scores(images, scores)
        return io.NodeOutput(list(scores.similarity), scores.summary(), overlay, scores,
                             json.dumps(scores.records(), indent=1), ui={"text": notices} if notices else None)


class InvAdapterSelectBest(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InvAdapterSelectBest",
            display_name="Inv-Adapter Select Best",
            category=CATEGORY,
            search_aliases=["best of", "best of n", "select best", "top k", "rerank", "pick best", "face id",
                            "likeness", "identity", "score"],
            description="Keeps the top-k images of a batch by face similarity (from Inv-Adapter Face Similarity), "
                        "best first, with their scores and batch indices: generate N, keep the most alike.",
            inputs=[
                io.Image.Input("images", tooltip="The batch that was scored (the same images as the Face Similarity "
                                                 "node's 'images')."),
                FaceScoresType.Input("scores", tooltip="The 'scores' output of Inv-Adapter Face Similarity."),
                io.Int.Input("top_k", default=1, min=1, max=4096,
                             tooltip="How many images to keep (fewer when the batch is smaller or has fewer faces)."),
                io.Boolean.Input("skip_no_face", default=True,
                                 tooltip="Never select images without a face; off: they rank last but can fill "
                                         "the top-k."),
            ],
            outputs=[
                io.Image.Output(display_name="images", tooltip="The selected images, most similar first."),
                io.Float.Output(display_name="similarity", is_output_list=True,
                                tooltip="Their similarities, in the same order (NaN = no face)."),
                io.Int.Output(display_name="indices", is_output_list=True,
                              tooltip="Their indices in the input batch (from 0)."),
                io.String.Output(display_name="summary", tooltip="The ranking as text."),
            ],
        )

    @classmethod
    def execute(cls, images, scores, top_k, skip_no_face) -> io.NodeOutput:
        batch = images.shape[0] if getattr(images, "ndim", 0) == 4 else 1
        if batch != len(scores):
            raise ValueError(f"the scores cover {len(scores)} images but this batch has {batch}: connect the same "
                             f"images to Inv-Adapter Face Similarity and to this node")
        chosen = face_scores.select_best(scores, top_k, skip_no_face)
        picked = (images if images.ndim == 4 else images[None])[torch.tensor(chosen, dtype=torch.long)]
        lines = [f"top {len(chosen)} of {batch} by face similarity ({scores.recognizer}):"]
        lines += [f"{rank + 1}. image {i}: {scores.label(i)}" for rank, i in enumerate(chosen)]
        return io.NodeOutput(picked, [scores.similarity[i] for i in chosen], chosen, "\n".join(lines))


NODES = [InvAdapterFaceSimilarity, InvAdapterSelectBest]
