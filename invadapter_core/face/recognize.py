"""Face identity: a face-recognition embedding per image and how alike two faces are (the paper's FACE-SIM).

Recognizers (chosen like the face crop's detector: ``auto`` = InsightFace when its package and models are present,
else dlib):

* ``insightface``: ArcFace from an InsightFace model pack in the face crop's layout
  (``<insightface folder>/models/<name>/``): ``glintr100.onnx`` (antelopev2) or ``w600k_r50.onnx`` (buffalo_l),
  the pack's own SCRFD detector for the box and five keypoints (``face.InsightFaceDetector``), InsightFace's
  112 px alignment, a 512-d embedding. **Similarity = cosine** of the embeddings (-1..1), the number the paper
  reports as FACE-SIM. InsightFace publishes no single same-person threshold; none is claimed here.
* ``dlib``: dlib's 128-d face-recognition ResNet (``dlib_face_recognition_resnet_model_v1.dat``) with its 5-point
  shape predictor for the alignment, both from the ``face-recognition-models`` package, run by ``dlib-bin`` (a
  prebuilt dlib); the box comes from the pack's MTCNN (``face.MTCNNDetector``). dlib compares descriptors by
  Euclidean **distance**: below 0.6 = the same person (dlib's own threshold; the network was trained with a margin
  around it). **Similarity = clamp(1 - distance / 1.2, 0, 1)**: a straight line through 1 at distance 0 and 0.5 at
  the 0.6 threshold, so 0.5 is where dlib's "same person" starts. The raw distance is always reported beside it.
  Measured on the ``face_recognition`` 1.3.0 test photos (tests/test_face_id.py): distance 0.34-0.45 between three
  photos of one man (similarity 0.62-0.72), 0.82-0.88 to another man (similarity 0.26-0.31).

Only the 5-point dlib model is used (the 68-point one, trained on iBUG 300-W, is not licensed for commercial use).
``face_recognition_models/__init__.py`` imports ``pkg_resources`` (gone from current setuptools), so its
``models/*.dat`` files are located with ``importlib.util.find_spec`` without importing the package.

Model management: each recognizer hangs off a weightless ``torch.nn.Module`` inside a real
``comfy.model_patcher.ModelPatcher`` (size = its weight files). Every use goes through
``comfy.model_management.load_models_gpu``, so ComfyUI lists it among its loaded models, and when ComfyUI unloads it
(the "Unload models" button / ``POST /free``, ``unload_all_models()``, or another model needing the memory) the
patcher's ``ON_DETACH`` callback drops the dlib networks / ONNX sessions; the next use loads them again.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence

import numpy as np
import torch

from ..comfyui.memory import ManagedObject, managed
from ..comfyui.notify import notify
from . import detect as face_core

log = logging.getLogger("InvAdapter")

RECOGNIZERS = ("auto", "insightface", "dlib")
DLIB_THRESHOLD = 0.6       # dlib's same-person distance
DLIB_ZERO_DISTANCE = 2 * DLIB_THRESHOLD  # the distance mapped to similarity 0
DLIB_FILES = {"shape": "shape_predictor_5_face_landmarks.dat", "net": "dlib_face_recognition_resnet_model_v1.dat"}
ARCFACE_FILES = {"antelopev2": "glintr100.onnx", "buffalo_l": "w600k_r50.onnx"}
MIN_FACE_SIZE = 32
# what a user without InsightFace can choose instead (named in InsightFace's errors)
RECOGNIZER_FALLBACK = "choose recognizer 'dlib' (pip install dlib-bin face-recognition-models; no model download)"


class FaceIdError(ValueError):
    """A user-facing refusal (missing package or model, no face in any reference)."""


class RecognizerUnavailable(FaceIdError):
    pass


# --------------------------------------------------------------------------------------------------- scales

@dataclass(frozen=True)
class SimilarityScale:
    """How a recognizer's two embeddings become (similarity, raw number)."""
    name: str                 # "dlib" or "arcface"
    raw_name: str             # what the raw number is: "distance" or "cosine"
    threshold: float | None   # the same-person boundary on the similarity scale (None: none published)
    description: str

    def compare(self, a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
        a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
        if self.name == "dlib":
            distance = float(np.linalg.norm(a - b))
            return min(1.0, max(0.0, 1.0 - distance / DLIB_ZERO_DISTANCE)), distance
        cosine = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))
        return cosine, cosine

    def verdict(self, similarity: float) -> str | None:
        if self.threshold is None or math.isnan(similarity):
            return None
        return "same person" if similarity >= self.threshold else "different"


DLIB_SCALE = SimilarityScale(
    "dlib", "distance", 0.5,
    f"dlib: similarity = 1 - distance/{DLIB_ZERO_DISTANCE:g} (0..1); 0.5 = dlib's same-person threshold "
    f"(distance {DLIB_THRESHOLD:g})")
ARCFACE_SCALE = SimilarityScale(
    "arcface", "cosine", None, "ArcFace: similarity = cosine of the embeddings (-1..1), the paper's FACE-SIM")


# --------------------------------------------------------------------------------------------------- recognizers

class Recognizer(Protocol):
    name: str
    scale: SimilarityScale
    detector: face_core.FaceDetector

    def describe(self, rgb: np.ndarray, face: face_core.Face) -> np.ndarray:
        """rgb: uint8 [H, W, 3] at full resolution, face in its pixels -> the embedding."""


def dlib_available() -> bool:
    find = importlib.util.find_spec
    return find("dlib") is not None and find("face_recognition_models") is not None


def dlib_model_files() -> dict[str, str]:
    """The .dat files inside the installed ``face-recognition-models`` package (its __init__ is never run)."""
    if importlib.util.find_spec("dlib") is None:
        raise RecognizerUnavailable(
            "the dlib face recognizer needs the optional package 'dlib-bin' (a prebuilt dlib; 'dlib' built from "
            "source works too) and 'face-recognition-models': pip install dlib-bin face-recognition-models")
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise RecognizerUnavailable(
            "the dlib face recognizer needs the optional package 'face-recognition-models' (dlib's model files): "
            "pip install face-recognition-models")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "models")
    files = {key: os.path.join(folder, name) for key, name in DLIB_FILES.items()}
    missing = [p for p in files.values() if not os.path.isfile(p)]
    if missing:
        raise RecognizerUnavailable(f"face-recognition-models is installed but lacks {', '.join(missing)}: "
                                    f"reinstall it (pip install --force-reinstall face-recognition-models)")
    return files


class DlibRecognizer:
    """MTCNN box -> dlib 5-point landmarks -> dlib's aligned 150 px chip -> 128-d descriptor (CPU; dlib-bin has no
    CUDA). MTCNN runs on ``device``."""

    name = "dlib"
    scale = DLIB_SCALE

    def __init__(self, device: torch.device | str = "cpu"):
        files = dlib_model_files()
        import dlib

        self.detector = face_core.MTCNNDetector(device)
        self.shape_predictor = dlib.shape_predictor(files["shape"])
        self.net = dlib.face_recognition_model_v1(files["net"])
        self._rectangle = dlib.rectangle

    def describe(self, rgb: np.ndarray, face: face_core.Face) -> np.ndarray:
        x1, y1, x2, y2 = (int(round(v)) for v in face.box)
        shape = self.shape_predictor(rgb, self._rectangle(x1, y1, x2, y2))
        # num_jitters 0: one deterministic pass (jittering averages random distortions of the chip)
        return np.asarray(self.net.compute_face_descriptor(rgb, shape, 0), dtype=np.float32)

    @staticmethod
    def weight_bytes() -> int:
        return sum(os.path.getsize(p) for p in dlib_model_files().values())


def arcface_file(root: str, model: str) -> str:
    path = os.path.join(root, "models", model, ARCFACE_FILES[model])
    if not os.path.isfile(path):
        raise face_core.InsightFaceModelsMissing(
            f"the InsightFace '{model}' pack in {os.path.dirname(path)}{os.sep} has no recognition model "
            f"{ARCFACE_FILES[model]}: copy it there from the '{model}' archive, or choose recognizer 'dlib'")
    return path


class InsightFaceRecognizer:
    """SCRFD box and five keypoints (the face crop's InsightFaceDetector) -> InsightFace's 112 px alignment ->
    ArcFace ONNX embedding (512-d). On a GPU device the CUDA execution provider is asked for first."""

    scale = ARCFACE_SCALE

    def __init__(self, root: str, model: str, gpu: Optional[int] = None):
        face_core.require_insightface("recognizer", RECOGNIZER_FALLBACK)
        path = arcface_file(root, model)
        import onnxruntime
        from insightface.model_zoo.arcface_onnx import ArcFaceONNX
        from insightface.utils import face_align

        self.name = f"insightface:{model}"
        self.detector = face_core.InsightFaceDetector(root, model, gpu=gpu)
        session = onnxruntime.InferenceSession(path, providers=face_core.onnx_providers(gpu))
        self.arcface = ArcFaceONNX(model_file=path, session=session)
        self._norm_crop = face_align.norm_crop

    def describe(self, rgb: np.ndarray, face: face_core.Face) -> np.ndarray:
        if face.landmarks is None or len(face.landmarks) != 5:
            raise FaceIdError("the InsightFace detector returned no five keypoints for the alignment")
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        aligned = self._norm_crop(bgr, landmark=np.asarray(face.landmarks, np.float32), image_size=112)
        return np.asarray(self.arcface.get_feat(aligned), dtype=np.float32).ravel()


# --------------------------------------------------------------------------------------------------- ComfyUI memory
ManagedRecognizer = ManagedObject  # a recognizer as ComfyUI's memory manager holds it (comfyui.memory)


def _dlib(device: torch.device) -> ManagedRecognizer:
    dlib_model_files()  # refuse early, with the packages to install
    return managed(("dlib", str(device)), "dlib", lambda: DlibRecognizer(device),
                   DlibRecognizer.weight_bytes)


def _insightface(roots: Sequence[str], model: str, device: torch.device) -> ManagedRecognizer:
    face_core.require_insightface("recognizer", RECOGNIZER_FALLBACK)
    root = face_core.find_insightface_models(roots, model, RECOGNIZER_FALLBACK)
    path = arcface_file(root, model)
    gpu = face_core.onnx_gpu(device)
    return managed((f"insightface:{model}", root, gpu), f"insightface:{model}",
                   lambda: InsightFaceRecognizer(root, model, gpu=gpu),
                   lambda: os.path.getsize(path))


def get_recognizer(choice: str = "auto", *, insightface_roots: Sequence[str] = (),
                   insightface_model: str = "antelopev2", device: torch.device | str = "cpu") -> ManagedRecognizer:
    """The managed recognizer for a choice of RECOGNIZERS; call ``.get()`` on it before each use.
    ``auto``: InsightFace when the package and the model pack (with its recognition model) are present and load,
    else dlib."""
    if choice not in RECOGNIZERS:
        raise FaceIdError(f"unknown recognizer '{choice}'; choose one of {', '.join(RECOGNIZERS)}")
    if insightface_model not in face_core.INSIGHTFACE_MODELS:
        raise FaceIdError(f"unknown InsightFace model '{insightface_model}'; choose "
                          f"{' or '.join(face_core.INSIGHTFACE_MODELS)}")
    device = torch.device(device)
    if choice == "dlib":
        return _dlib(device)
    if choice == "insightface":
        return _insightface(insightface_roots, insightface_model, device)
    if face_core.insightface_available():
        try:
            managed = _insightface(insightface_roots, insightface_model, device)
            managed.get()
            return managed
        except face_core.InsightFaceModelsMissing as e:
            log.info("InvAdapter face similarity: no InsightFace '%s' recognizer (%s); using dlib",
                     insightface_model, str(e).splitlines()[0])
        except Exception as e:  # noqa: BLE001 - auto means "the best that works": say why, then fall back
            notify(f"face similarity: InsightFace '{insightface_model}' failed to load ({type(e).__name__}: {e}); "
                   f"using dlib")
    if not dlib_available():
        raise RecognizerUnavailable(
            "no face recognizer is installed: pip install dlib-bin face-recognition-models (dlib, works offline), "
            f"or pip install insightface onnxruntime with the '{insightface_model}' models in "
            f"models/insightface/models/{insightface_model}/")
    return _dlib(device)


# --------------------------------------------------------------------------------------------------- embeddings

@dataclass
class FaceEmbedding:
    vector: np.ndarray
    face: face_core.Face  # the face it came from, in source pixels


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """RGB float [H, W, 3] in 0..1 (any device) -> uint8 [H, W, 3]."""
    return np.ascontiguousarray((image.detach().float().clamp(0, 1) * 255.0 + 0.5).to("cpu", torch.uint8).numpy())


def embed_image(recognizer: Recognizer, image: torch.Tensor, min_face_size: float = MIN_FACE_SIZE
                ) -> FaceEmbedding | None:
    """The largest face of one RGB [H, W, 3] float image, or None when there is none."""
    faces = face_core.detect_faces(recognizer.detector, image, min_face_size)
    chosen = face_core.select_face(faces, "largest")
    if chosen is None:
        return None
    return FaceEmbedding(recognizer.describe(to_uint8(image), chosen), chosen)


def embed_batch(recognizer: Recognizer, images: torch.Tensor, min_face_size: float = MIN_FACE_SIZE,
                before_image: Callable[[int], None] | None = None,
                after_image: Callable[[int], None] | None = None) -> list[FaceEmbedding | None]:
    rgb = face_core.to_rgb(images)
    out = []
    for i in range(rgb.shape[0]):
        if before_image is not None:
            before_image(i)
        out.append(embed_image(recognizer, rgb[i], min_face_size))
        if after_image is not None:
            after_image(i)
    return out
