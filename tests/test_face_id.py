"""invadapter_core.face.recognize on real labelled photos (face_recognition 1.3.0's test photos, fetched at test time): the
same person's photos score clearly above another person's; the recognizer loads once and ComfyUI's model
management releases it; missing packages are named; the InsightFace path is checked with a stand-in package (no
InsightFace models exist here)."""
from __future__ import annotations

import importlib.machinery
import itertools
import os
import sys
import types

import numpy as np
import pytest
import torch

from invadapter_core.face import detect as face_core
from invadapter_core.face import recognize as face_id
from invadapter_core.face import scores as face_scores
from support import faces

pytest.importorskip("dlib", reason="pip install dlib-bin face-recognition-models (requirements-dev.txt)")


@pytest.fixture(scope="module")
def embeddings(photos, dlib_recognizer):
    recognizer = dlib_recognizer.get()
    return {name: face_id.embed_batch(recognizer, image)[0] for name, image in photos.items()}


def test_same_person_scores_clearly_above_another(embeddings):
    scale = face_id.DLIB_SCALE
    assert all(e is not None for e in embeddings.values())
    assert all(e.vector.shape == (128,) for e in embeddings.values())
    same = [scale.compare(embeddings[a].vector, embeddings[b].vector)
            for a, b in itertools.combinations(faces.SAME_PERSON, 2)]
    other = [scale.compare(embeddings[a].vector, embeddings[faces.OTHER_PERSON].vector) for a in faces.SAME_PERSON]
    print(f"\ndlib distance same person {[round(d, 3) for _, d in same]}, other {[round(d, 3) for _, d in other]}; "
          f"similarity margin {min(s for s, _ in same) - max(s for s, _ in other):.3f}")
    # raw distances on both sides of dlib's 0.6 threshold, as measured in issue 15 (0.36-0.42 / 0.76-0.85)
    assert all(0.2 < d < 0.5 for _, d in same) and all(0.7 < d < 1.0 for _, d in other)
    # the 0..1 similarity: 1 - d/1.2, same person above 0.5 (the threshold), the other below, with a wide margin
    assert all(s == pytest.approx(1 - d / 1.2) for s, d in same + other)
    assert min(s for s, _ in same) - max(s for s, _ in other) > 0.25
    assert all(scale.verdict(s) == "same person" for s, _ in same)
    assert all(scale.verdict(s) == "different" for s, _ in other)


def test_identical_embeddings_and_scales():
    v = np.linspace(-1, 1, 128).astype(np.float32)
    assert face_id.DLIB_SCALE.compare(v, v) == (1.0, 0.0)
    assert face_id.DLIB_SCALE.compare(v, v + 10.0)[0] == 0.0  # clamped
    assert face_id.ARCFACE_SCALE.compare(v, 3 * v) == pytest.approx((1.0, 1.0))
    assert face_id.ARCFACE_SCALE.compare(v, -v)[0] == pytest.approx(-1.0)
    assert face_id.ARCFACE_SCALE.verdict(0.9) is None  # no published threshold, no verdict


def test_loaded_once_and_released_by_comfy_model_management(photos, dlib_recognizer):
    import comfy.model_management as mm

    managed = face_id.get_recognizer("dlib")
    assert managed is dlib_recognizer  # one per process and device
    first = managed.get()
    loads = managed.loads
    assert managed.get() is first and managed.loads == loads
    assert any(m is managed.patcher for m in mm.loaded_models())
    before = face_id.embed_batch(first, photos["obama2"])[0].vector

    mm.unload_all_models()  # what ComfyUI's "Unload models" / POST /free does
    assert not managed.loaded and not any(m is managed.patcher for m in mm.loaded_models())
    again = managed.get()
    assert managed.loads == loads + 1 and again is not first
    assert np.array_equal(face_id.embed_batch(again, photos["obama2"])[0].vector, before)


def test_missing_packages_are_named(monkeypatch, tmp_path):
    real = importlib.util.find_spec

    def _hide(monkeypatch, *names):
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in names else real(name, *a))

    _hide(monkeypatch, "dlib")
    with pytest.raises(face_id.RecognizerUnavailable, match="pip install dlib-bin face-recognition-models"):
        face_id.get_recognizer("dlib", device="cuda:7")  # a key never built: no cached recognizer answers
    _hide(monkeypatch, "face_recognition_models")
    with pytest.raises(face_id.RecognizerUnavailable, match="pip install face-recognition-models"):
        face_id.dlib_model_files()
    if not face_core.insightface_available():
        with pytest.raises(face_core.DetectorUnavailable, match="pip install insightface onnxruntime"):
            face_id.get_recognizer("insightface", insightface_roots=[str(tmp_path)])
        _hide(monkeypatch, "dlib", "face_recognition_models")
        with pytest.raises(face_id.RecognizerUnavailable, match="dlib-bin face-recognition-models.*insightface"):
            face_id.get_recognizer("auto", insightface_roots=[str(tmp_path)])
    with pytest.raises(face_id.FaceIdError, match="unknown recognizer"):
        face_id.get_recognizer("facenet")


def _touch(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"not a real model")


def test_insightface_recognizer_with_a_stand_in_package(tmp_path, monkeypatch):
    """No real InsightFace here: stand-ins with the real API's shapes (FaceAnalysis, ArcFaceONNX, norm_crop,
    onnxruntime.InferenceSession) check the model discovery, what the recognizer passes in and the cosine scale."""
    calls = {}

    class StandInFace:
        def __init__(self, bbox, kps):
            self.bbox, self.kps, self.det_score = np.asarray(bbox, np.float32), np.asarray(kps, np.float32), 0.9

    class FaceAnalysis:
        def __init__(self, name, root, allowed_modules=None, **kwargs):
            calls["detector"] = dict(name=name, root=root, **kwargs)

        def prepare(self, ctx_id=0, det_thresh=0.5, det_size=None):
            pass

        def get(self, img, max_num=0):
            # the face's keypoints move with the image's mean colour, so two images give two embeddings
            shift = float(img.mean())
            return [StandInFace([100, 50, 180, 150], [[120 + shift, 90], [160, 90], [140, 110], [125, 130],
                                                      [155, 130]])]

    class InferenceSession:
        def __init__(self, path, providers=None):
            calls["session"] = dict(path=path, providers=providers)

    class ArcFaceONNX:
        def __init__(self, model_file=None, session=None):
            calls["arcface"] = model_file

        def get_feat(self, aligned):
            return np.asarray(aligned, np.float32).reshape(1, -1)[:, :512]

    def norm_crop(img, landmark, image_size=112):
        calls.setdefault("norm_crop", []).append((img.shape, img[0, 0].tolist(), np.asarray(landmark).tolist()))
        return np.full((image_size, image_size, 3), landmark[0][0], np.float32)

    modules = {}
    for name in ("insightface", "insightface.app", "insightface.model_zoo", "insightface.model_zoo.arcface_onnx",
                 "insightface.utils", "insightface.utils.face_align", "onnxruntime"):
        modules[name] = types.ModuleType(name)
        modules[name].__spec__ = importlib.machinery.ModuleSpec(name, None)
        monkeypatch.setitem(sys.modules, name, modules[name])
    modules["insightface.app"].FaceAnalysis = FaceAnalysis
    modules["insightface.model_zoo.arcface_onnx"].ArcFaceONNX = ArcFaceONNX
    modules["insightface.utils.face_align"].norm_crop = norm_crop
    modules["insightface.utils"].face_align = modules["insightface.utils.face_align"]
    modules["onnxruntime"].InferenceSession = InferenceSession

    root = tmp_path / "insightface"
    _touch(str(root / "models" / "antelopev2" / "scrfd_10g_bnkps.onnx"))
    with pytest.raises(face_core.InsightFaceModelsMissing, match="no recognition model glintr100.onnx"):
        face_id.get_recognizer("insightface", insightface_roots=[str(root)])
    # auto falls back to dlib while the recognition model is missing
    assert face_id.get_recognizer("auto", insightface_roots=[str(root)]).kind == "dlib"

    _touch(str(root / "models" / "antelopev2" / "glintr100.onnx"))
    managed = face_id.get_recognizer("auto", insightface_roots=[str(tmp_path / "empty"), str(root)])
    recognizer = managed.get()
    assert managed.kind == "insightface:antelopev2" and recognizer.name == "insightface:antelopev2"
    assert calls["arcface"] == str(root / "models" / "antelopev2" / "glintr100.onnx")
    assert calls["session"]["providers"] == ["CPUExecutionProvider"]
    assert calls["detector"]["root"] == str(root)

    red = torch.zeros(1, 200, 300, 3)
    red[..., 0] = 1.0
    scores = face_scores.score_batch(recognizer, red, torch.cat([red, red * 0.5]))
    shape, corner, landmarks = calls["norm_crop"][0]
    assert shape == (200, 300, 3) and corner == [0, 0, 255]  # the full image, BGR, as InsightFace expects
    assert len(landmarks) == 5 and landmarks[1] == [160.0, 90.0]  # source-pixel keypoints from the detector
    assert scores.scale is face_id.ARCFACE_SCALE and scores.similarity[0] == pytest.approx(1.0)
    assert scores.raw == scores.similarity and "cosine" in scores.summary()

    face_id.get_recognizer("insightface", insightface_roots=[str(root)], device="cuda:2").get()  # its own GPU
    assert calls["session"]["providers"] == [("CUDAExecutionProvider", {"device_id": 2}), "CPUExecutionProvider"]
    assert calls["detector"]["providers"] == calls["session"]["providers"]  # its detector on the same GPU


def test_recognizers_are_imported_lazily():
    """Loading the node pack (these modules) imports neither dlib nor InsightFace: only scoring does."""
    import subprocess

    code = ("import sys, invadapter_core.face.recognize, invadapter_core.face.scores, invadapter_core.face.overlay; "
            "print(sorted(m for m in ('dlib', 'insightface', 'onnxruntime', 'face_recognition_models') "
            "if m in sys.modules))")
    root = os.path.join(os.path.dirname(__file__), "..")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
