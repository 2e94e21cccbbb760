"""Scoring a batch against one identity: per-image similarity to the reference photo(s) (NaN where an image has no
face), the text and JSON summaries, and the top-k selection. The recognizers and their scales: ``recognize``."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from .recognize import MIN_FACE_SIZE, FaceEmbedding, FaceIdError, Recognizer, SimilarityScale, embed_batch
from ..comfyui.notify import notify

COMBINE = ("mean", "max")  # how the similarities to several reference photos become one number


@dataclass
class FaceScores:
    """Per-image similarity of a batch to one identity's reference photo(s); NaN = no face in that image.
    The value of the INVADAPTER_FACE_SCORES type (treat as read-only: ComfyUI caches it)."""
    recognizer: str
    scale: SimilarityScale
    combine: str
    similarity: list[float]
    raw: list[float]
    per_reference: list[list[float]]          # [image][reference used]
    faces: list[dict | None]                  # the chosen face per image (box, score, landmarks)
    references_used: list[int]                # reference batch indices that had a face
    references_without_face: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.similarity)

    @property
    def without_face(self) -> list[int]:
        return [i for i, s in enumerate(self.similarity) if math.isnan(s)]

    def label(self, i: int) -> str:
        s = self.similarity[i]
        if math.isnan(s):
            return "no face"
        text = f"{s:.3f} ({self.scale.raw_name} {self.raw[i]:.3f})"
        verdict = self.scale.verdict(s)
        return f"{text} {verdict}" if verdict else text

    def records(self) -> list[dict]:
        """JSON-ready, one per image (NaN written as null)."""
        def num(x):
            return None if math.isnan(x) else round(float(x), 4)

        return [{"batch_index": i, "similarity": num(self.similarity[i]), self.scale.raw_name: num(self.raw[i]),
                 "face_found": not math.isnan(self.similarity[i]), "verdict": self.scale.verdict(self.similarity[i]),
                 "per_reference": [num(x) for x in self.per_reference[i]], "face": self.faces[i]}
                for i in range(len(self))]

    def summary(self) -> str:
        n_ref = len(self.references_used) + len(self.references_without_face)
        lines = [f"Face similarity, recognizer {self.recognizer} ({self.scale.description}); "
                 f"{len(self.references_used)} of {n_ref} reference image(s) with a face"
                 + (f", {self.combine} over them" if len(self.references_used) > 1 else "")]
        if self.references_without_face:
            lines.append("references without a face (not used): "
                         + ", ".join(str(i) for i in self.references_without_face))
        lines += [f"image {i}: {self.label(i)}" for i in range(len(self))]
        found = [i for i in range(len(self)) if i not in set(self.without_face)]
        if found:
            best = max(found, key=lambda i: self.similarity[i])
            values = [self.similarity[i] for i in found]
            lines.append(f"best: image {best} ({self.similarity[best]:.3f}); mean {float(np.mean(values)):.3f} "
                         f"over {len(found)} image(s) with a face")
        if self.without_face:
            lines.append(f"no face in image(s) {', '.join(str(i) for i in self.without_face)} (similarity NaN)")
        return "\n".join(lines)


def reference_embeddings(recognizer: Recognizer, references: torch.Tensor, min_face_size: float = MIN_FACE_SIZE
                         ) -> tuple[list[np.ndarray], list[int], list[int]]:
    """(vectors, indices used, indices without a face); FaceIdError when no reference has a face."""
    embedded = embed_batch(recognizer, references, min_face_size)
    used = [i for i, e in enumerate(embedded) if e is not None]
    missing = [i for i, e in enumerate(embedded) if e is None]
    if not used:
        raise FaceIdError(
            f"no face found in the reference image{'s' if len(embedded) > 1 else ''} (batch of {len(embedded)}, "
            f"recognizer {recognizer.name}, min_face_size {min_face_size:g} px): connect a photo where the face is "
            f"visible, or lower min_face_size")
    if missing:
        notify(f"face similarity: no face in reference image(s) {', '.join(str(i) for i in missing)} (batch of "
               f"{len(embedded)}); scoring against the other(s)")
    return [embedded[i].vector for i in used], used, missing


def score_embeddings(scale: SimilarityScale, refs: Sequence[np.ndarray], embedded: Sequence[FaceEmbedding | None],
                     combine: str = "mean") -> tuple[list[float], list[float], list[list[float]]]:
    """(similarity, raw, per-reference similarity) per embedded image, NaN where None."""
    if combine not in COMBINE:
        raise FaceIdError(f"unknown combine '{combine}'; choose one of {', '.join(COMBINE)}")
    similarity, raw, per_reference = [], [], []
    for e in embedded:
        if e is None:
            similarity.append(math.nan)
            raw.append(math.nan)
            per_reference.append([math.nan] * len(refs))
            continue
        pairs = [scale.compare(r, e.vector) for r in refs]
        sims = [p[0] for p in pairs]
        per_reference.append(sims)
        if combine == "mean":
            similarity.append(float(np.mean(sims)))
            raw.append(float(np.mean([p[1] for p in pairs])))
        else:
            best = int(np.argmax(sims))
            similarity.append(sims[best])
            raw.append(pairs[best][1])
    return similarity, raw, per_reference


def score_batch(recognizer: Recognizer, references: torch.Tensor, images: torch.Tensor, *, combine: str = "mean",
                min_face_size: float = MIN_FACE_SIZE, before_image: Callable[[int], None] | None = None,
                after_image: Callable[[int], None] | None = None) -> FaceScores:
    """Similarity of every image of ``images`` to the identity of ``references`` (a batch = photos of one person)."""
    refs, used, missing = reference_embeddings(recognizer, references, min_face_size)
    embedded = embed_batch(recognizer, images, min_face_size, before_image, after_image)
    similarity, raw, per_reference = score_embeddings(recognizer.scale, refs, embedded, combine)
    faces = [None if e is None else e.face.to_dict() for e in embedded]
    return FaceScores(recognizer.name, recognizer.scale, combine, similarity, raw, per_reference, faces, used, missing)


def select_best(scores: FaceScores, k: int, skip_no_face: bool = True) -> list[int]:
    """Batch indices of the k most similar images, best first (ties: lower index first). Images without a face rank
    last, or are never chosen with ``skip_no_face``."""
    if k < 1:
        raise FaceIdError(f"top_k {k} is below 1")
    order = sorted(range(len(scores)), key=lambda i: (math.isnan(scores.similarity[i]),
                                                       -(0.0 if math.isnan(scores.similarity[i])
                                                         else scores.similarity[i]), i))
    if skip_no_face:
        order = [i for i in order if not math.isnan(scores.similarity[i])]
        if not order:
            raise FaceIdError(f"none of the {len(scores)} images has a face (recognizer {scores.recognizer}): "
                              f"nothing to select; turn skip_no_face off to pass them through")
    return order[:k]
