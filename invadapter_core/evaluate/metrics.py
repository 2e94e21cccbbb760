"""The evaluation's metrics: FACE-SIM (with the copy-paste indicator), CLIP-T and CLIP-I.

* FACE-SIM: ``invadapter_core.face.recognize`` (recognizer and scale as chosen; ArcFace cosine is the paper's number).
  Per identity, the reference photo's embedding and its other photos' embeddings are computed once.
  Copy-paste indicator: ``real_photo_sim`` = similarity of the reference photo to the person's other photos (what
  "another real photo of the same person" scores); ``copy_paste`` = face_sim - real_photo_sim. Above 0, a
  generation resembles the reference photo more than the person's own photos resemble each other: the face was
  copied rather than re-imagined. ``face_sim_other_photos`` = similarity of the generation to those other photos.
* CLIP-I: cosine of the CLIP image embeddings (ComfyUI's CLIPVisionLoader / CLIPVisionEncode, centre crop, the
  projected ``image_embeds``) of the generation and the reference face crop.
* CLIP-T: cosine of the generation's CLIP image embedding and the prompt's CLIP text embedding (ComfyUI's
  CLIPLoader / CLIPTextEncode, the projected pooled output). Text and image must come from the same CLIP model
  (e.g. clip_l.safetensors with a ViT-L/14 clip_vision file); the text file must carry its text projection (an
  SD1.5 checkpoint's text encoder does not).
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from ..face import recognize as face_id
from .pipeline import Nodes, PipelineError, model_name

log = logging.getLogger("InvAdapter.evaluate")


@dataclass
class IdentityFaces:
    reference: np.ndarray | None   # None: no face in the reference photo
    others: list[np.ndarray]       # the other photos that have a face
    real_photo_sim: float          # reference vs others, NaN without both


class FaceMetric:
    def __init__(self, choice: str, insightface_model: str, insightface_roots, device, min_face_size: int):
        self.managed = face_id.get_recognizer(choice, insightface_roots=insightface_roots,
                                              insightface_model=insightface_model, device=device)
        self.min_face_size = min_face_size
        recognizer = self.managed.get()
        self.name, self.scale = recognizer.name, recognizer.scale

    def embed(self, image: torch.Tensor) -> np.ndarray | None:
        """One image [H, W, 3] or [1, H, W, 3] -> the largest face's embedding, or None."""
        found = face_id.embed_batch(self.managed.get(), image, self.min_face_size)[0]
        return None if found is None else found.vector

    def identity(self, reference: torch.Tensor, others: list[torch.Tensor]) -> IdentityFaces:
        ref = self.embed(reference)
        other = [v for v in (self.embed(o) for o in others) if v is not None]
        real = math.nan
        if ref is not None and other:
            real = float(np.mean([self.scale.compare(ref, v)[0] for v in other]))
        return IdentityFaces(ref, other, real)

    def score(self, image: torch.Tensor, faces: IdentityFaces) -> dict:
        vec = self.embed(image)
        row = {"face_found": vec is not None, "face_sim": math.nan, "face_raw": math.nan,
               "face_sim_other_photos": math.nan, "real_photo_sim": faces.real_photo_sim, "copy_paste": math.nan}
        if vec is None or faces.reference is None:
            return row
        row["face_sim"], row["face_raw"] = self.scale.compare(faces.reference, vec)
        if faces.others:
            row["face_sim_other_photos"] = float(np.mean([self.scale.compare(o, vec)[0] for o in faces.others]))
        if not math.isnan(faces.real_photo_sim):
            row["copy_paste"] = row["face_sim"] - faces.real_photo_sim
        return row


def _keys(path: str) -> set[str] | None:
    if not path.endswith(".safetensors"):
        return None
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return set(f.keys())


def _has(keys: set[str] | None, *suffixes: str) -> bool:
    return keys is None or any(k == s or k.endswith("." + s) for k in keys for s in suffixes)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0))


class ClipMetric:
    """CLIP-I and CLIP-T, or the reason each is skipped (``skipped``)."""

    def __init__(self, nodes: Nodes, clip: str | None, clip_vision: str | None):
        """Checks the files and resolves their names now; loads them at the first use."""
        self.nodes = nodes
        self.skipped: dict[str, str] = {}
        self.vision_name = self.text_name = None
        self._vision = self._text_model = None
        self._text_cache: dict[str, torch.Tensor] = {}
        how = ("pass --clip-vision FILE (a ComfyUI clip_vision model, e.g. a CLIP ViT-L/14 vision file) for CLIP-I, "
               "and --clip FILE (the matching CLIP text encoder, e.g. clip_l.safetensors) as well for CLIP-T")
        if clip_vision is None:
            self.skipped["clip_i"] = f"CLIP-I skipped: no CLIP vision model given; {how}"
            self.skipped["clip_t"] = f"CLIP-T skipped: no CLIP vision model given; {how}"
            return
        vision_path = os.path.abspath(clip_vision) if os.path.isfile(clip_vision) else clip_vision
        if not _has(_keys(vision_path) if os.path.isfile(vision_path) else None, "visual_projection.weight", "proj"):
            raise PipelineError(f"{clip_vision} has no visual projection (visual_projection.weight): CLIP-I/CLIP-T "
                                f"need a CLIP vision model with its projection")
        self.vision_name = model_name("clip_vision", clip_vision, "CLIP vision model")
        if clip is None:
            self.skipped["clip_t"] = f"CLIP-T skipped: no CLIP text encoder given; {how}"
            return
        if os.path.isfile(clip) and not _has(_keys(clip), "text_projection.weight", "text_projection"):
            self.skipped["clip_t"] = (f"CLIP-T skipped: {clip} has no text projection (text_projection.weight), so "
                                      f"its text embeddings are not in CLIP's joint space; use a CLIP text encoder "
                                      f"file that carries it (e.g. clip_l.safetensors)")
            return
        self.text_name = model_name("text_encoders", clip, "CLIP text encoder")

    def image(self, image: torch.Tensor) -> torch.Tensor | None:
        if self.vision_name is None:
            return None
        if self._vision is None:
            self._vision = self.nodes.comfy_node("CLIPVisionLoader", clip_name=self.vision_name)[0]
        image = image if image.ndim == 4 else image[None]
        return self.nodes.comfy_node("CLIPVisionEncode", clip_vision=self._vision, image=image,
                                     crop="center")[0].image_embeds[0]

    def text(self, prompt: str) -> torch.Tensor | None:
        if self.text_name is None:
            return None
        if self._text_model is None:
            self._text_model = self.nodes.comfy_node("CLIPLoader", clip_name=self.text_name, type="stable_diffusion",
                                                     device="default")[0]
        if prompt not in self._text_cache:
            conditioning = self.nodes.comfy_node("CLIPTextEncode", clip=self._text_model, text=prompt)[0]
            self._text_cache[prompt] = conditioning[0][1]["pooled_output"][0]
        return self._text_cache[prompt]

    def scores(self, generated: torch.Tensor, reference_embedding: torch.Tensor | None, prompt: str) -> dict:
        image = self.image(generated)
        row = {"clip_i": math.nan, "clip_t": math.nan}
        if image is None:
            return row
        if reference_embedding is not None:
            row["clip_i"] = cosine(image, reference_embedding)
        text = self.text(prompt)
        if text is not None:
            if text.numel() != image.numel():
                self.skipped["clip_t"] = (f"CLIP-T skipped: the text embedding has {text.numel()} dimensions and the "
                                          f"image embedding {image.numel()}: --clip and --clip-vision are not the "
                                          f"same CLIP model")
                self.text_name = None
            else:
                row["clip_t"] = cosine(image, text)
        return row
