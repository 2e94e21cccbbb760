"""InvAdapterFaceCrop and invadapter_core.face.detect on real images (scikit-image's bundled data) and the real host.

Ground truth for skimage.data.astronaut() (512 x 512, Eileen Collins), read off the image by eye on a 10 px grid
(not from any detector): eye centres (202, 101) and (245, 103), nose tip (222, 125), mouth corners (202, 141) and
(245, 141), chin (224, 177); the face (cheek to cheek at nose height, fringe edge to chin) spans x 185-270,
y 82-177.
"""
from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pytest
import torch

from invadapter_core.face import detect as fc

skdata = pytest.importorskip("skimage.data")

GT_FACE = (185.0, 82.0, 270.0, 177.0)
EYES = [(202, 101), (245, 103)]
NOSE = (222, 125)
MOUTH = [(202, 141), (245, 141)]
CHIN = (224, 177)
INNER = EYES + [NOSE] + MOUTH  # points every face box must contain


# ------------------------------------------------------------------------------------------------ helpers

def astronaut() -> torch.Tensor:
    return torch.from_numpy(skdata.astronaut()).float()[None] / 255.0


def grey_rgb(name: str) -> torch.Tensor:
    g = torch.from_numpy(getattr(skdata, name)()).float() / 255.0
    return g[None, ..., None].expand(1, *g.shape, 3).contiguous()


def noise(h=512, w=512, seed=0) -> torch.Tensor:
    return torch.rand(1, h, w, 3, generator=torch.Generator().manual_seed(seed))


def resize(img: torch.Tensor, h: int, w: int) -> torch.Tensor:
    x = torch.nn.functional.interpolate(img.movedim(-1, 1), size=(h, w), mode="bilinear", align_corners=False)
    return x.movedim(1, -1).clamp(0, 1)


def contains(box, pts, slack=0.0) -> bool:
    x1, y1, x2, y2 = box
    return all(x1 - slack <= x <= x2 + slack and y1 - slack <= y <= y2 + slack for x, y in pts)


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def mask_bbox(mask: torch.Tensor):
    ys, xs = torch.nonzero(mask > 0.5, as_tuple=True)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def assert_mask_matches_box(mask: torch.Tensor, box):
    x1, y1, x2, y2 = math.floor(box[0]), math.floor(box[1]), math.ceil(box[2]), math.ceil(box[3])
    assert mask_bbox(mask) == (x1, y1, x2, y2)
    assert float(mask.sum()) == pytest.approx((x2 - x1) * (y2 - y1))  # a filled rectangle, nothing else
    assert bool(((mask == 0) | (mask == 1)).all())


@pytest.fixture(scope="module")
def det():
    return fc.get_detector("mtcnn")


# ------------------------------------------------------------------------------------------------ the astronaut

def test_astronaut_exactly_one_face_and_crop_contains_it(det):
    img = astronaut()
    r = fc.crop_faces(img, det)  # defaults: 512 px, margin 0.5, largest, min 40 px, error on no face
    assert r.crops.shape == (1, 512, 512, 3) and r.masks.shape == (1, 512, 512)
    assert r.crops.dtype == torch.float32 and 0.0 <= float(r.crops.min()) and float(r.crops.max()) <= 1.0
    rec = r.records[0]
    assert len(rec["faces"]) == 1 and rec["fallback"] is None and r.missing == []
    box = rec["face"]["box"]
    assert contains(box, INNER), box
    assert iou(box, GT_FACE) > 0.5, box
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    assert abs(cx - 227) < 20 and abs(cy - 130) < 25
    assert 60 < box[2] - box[0] < 130 and 70 < box[3] - box[1] < 150
    assert rec["face"]["score"] > 0.95
    eyes = rec["face"]["landmarks"][:2]
    assert all(math.dist(p, q) < 8 for p, q in zip(eyes, EYES)), eyes
    # the crop: a square around the box with the margin, holding the whole face (chin, cheeks) and centred on it
    x1, y1, x2, y2 = rec["crop"]
    assert x2 - x1 == y2 - y1
    side = max(box[2] - box[0], box[3] - box[1]) * 2.0
    assert abs((x2 - x1) - side) <= 1.0
    assert contains((x1, y1, x2, y2), INNER + [CHIN, (185, 125), (270, 125)])
    assert 0 <= x1 and 0 <= y1 and x2 <= 512 and y2 <= 512
    # mask and box agree; the mask is on the source image
    assert_mask_matches_box(r.masks[0], box)
    # the crop's pixels are the source region's (resized)
    region = img[0, y1:y2, x1:x2]
    assert torch.allclose(r.crops[0].mean(dim=(0, 1)), region.mean(dim=(0, 1)), atol=0.01)
    # the JSON-ready record round-trips
    assert json.loads(json.dumps(r.records)) == r.records


def test_shipped_asset_is_the_astronaut_face(det):
    from PIL import Image

    path = os.path.join(os.path.dirname(__file__), "..", "assets", "face.png")
    assert os.path.getsize(path) < 200_000
    a = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).float()[None] / 255
    assert a.shape == (1, 288, 288, 3)
    r = fc.crop_faces(a, det)
    box = r.records[0]["face"]["box"]
    assert contains(box, [(x - 96, y) for x, y in INNER])


def test_output_size_and_margin(det):
    img = astronaut()
    r0 = fc.crop_faces(img, det, size=256, margin=0.0)
    box = r0.records[0]["face"]["box"]
    x1, y1, x2, y2 = r0.records[0]["crop"]
    assert r0.crops.shape == (1, 256, 256, 3)
    assert abs((x2 - x1) - max(box[2] - box[0], box[3] - box[1])) <= 1
    # a margin too large for the image: the square shrinks to the image and stays inside it
    r = fc.crop_faces(img, det, margin=3.0, size=64)
    assert r.records[0]["crop"] == [0, 0, 512, 512] and r.crops.shape == (1, 64, 64, 3)
    # near the border: shifted inside, still square, still holds the face
    shifted = img[:, :, 150:]  # 512 x 362, face at x ~ 35..120
    r = fc.crop_faces(shifted, det, margin=1.0)
    x1, y1, x2, y2 = r.records[0]["crop"]
    assert x1 == 0 and x2 - x1 == y2 - y1 and contains((x1 + 150, y1, x2 + 150, y2), INNER)


def test_face_selection_largest_index_confidence_and_min_size(det):
    big = astronaut()[0]
    small = resize(big[None], 256, 256)[0]
    canvas = torch.full((512, 1024, 3), 0.8)
    canvas[:256, 40:296] = small        # small face on the left
    canvas[:, 512:] = big               # large face on the right
    canvas = canvas[None]
    largest = fc.crop_faces(canvas, det, select="largest")
    faces = largest.records[0]["faces"]
    assert len(faces) == 2
    assert faces[0]["box"][0] < faces[1]["box"][0]                   # sorted left to right
    assert largest.records[0]["face"]["box"][0] > 512                 # the big one
    left = fc.crop_faces(canvas, det, select="index (left to right)", index=0)
    assert left.records[0]["face"]["box"][2] < 512
    right = fc.crop_faces(canvas, det, select="index (left to right)", index=1)
    assert right.records[0]["face"] == largest.records[0]["face"]
    conf = fc.crop_faces(canvas, det, select="most confident")
    assert conf.records[0]["face"]["score"] == max(f["score"] for f in faces)
    # an index past the faces found counts as "no face", with a note
    with pytest.raises(fc.FaceCropError, match="face index 5"):
        fc.crop_faces(canvas, det, select="index (left to right)", index=5)
    r = fc.crop_faces(canvas, det, select="index (left to right)", index=5, on_no_face="center crop")
    assert "2 face(s) found" in r.records[0]["note"]
    # min_face_size leaves only the big face, then none
    only_big = fc.crop_faces(canvas, det, min_face_size=80)
    assert len(only_big.records[0]["faces"]) == 1
    with pytest.raises(fc.FaceCropError, match="No face found"):
        fc.crop_faces(canvas, det, min_face_size=400)


# ------------------------------------------------------------------------------------------------ no face

def mixed_batch() -> torch.Tensor:
    """0: astronaut, 1: noise, 2: brick (grey texture), 3: mirrored astronaut, 4: a rocket launch scene."""
    rocket = torch.from_numpy(skdata.rocket()).float()[None, :, 100:527] / 255.0  # 427 x 427
    return torch.cat([astronaut(), noise(), grey_rgb("brick"), astronaut().flip(2), resize(rocket, 512, 512)])


def test_faceless_images_error_lists_indices(det):
    for img in (noise(), grey_rgb("brick"), grey_rgb("grass")):
        with pytest.raises(fc.FaceCropError, match=r"No face found in batch image 0 of 1"):
            fc.crop_faces(img, det)
    with pytest.raises(fc.FaceCropError) as e:
        fc.crop_faces(mixed_batch(), det)
    msg = str(e.value)
    assert "batch images 1, 2, 4 of 5" in msg and "Images 0, 3 had one" in msg and "center crop" in msg


def test_faceless_images_center_crop_keeps_every_image(det, caplog):
    batch = mixed_batch()
    with caplog.at_level("WARNING", logger="InvAdapter"):
        r = fc.crop_faces(batch, det, on_no_face="center crop", size=128)
    assert "1, 2, 4" in caplog.text
    assert r.crops.shape == (5, 128, 128, 3) and r.masks.shape == (5, 512, 512)
    assert r.missing == [1, 2, 4]
    for i, rec in enumerate(r.records):
        assert rec["batch_index"] == i and rec["crop_index"] == i
        if i in (1, 2, 4):
            assert rec["face"] is None and rec["fallback"] == "center crop" and rec["crop"] == [0, 0, 512, 512]
            assert float(r.masks[i].sum()) == 0
        else:
            assert contains(rec["face"]["box"], INNER if i == 0 else [(511 - x, y) for x, y in INNER])
            assert_mask_matches_box(r.masks[i], rec["face"]["box"])
    # a faceless non-square image: the centre square
    r = fc.crop_faces(noise(200, 300), det, on_no_face="center crop")
    assert r.records[0]["crop"] == [50, 0, 250, 200]


def test_faceless_images_skip_keeps_the_faces(det):
    r = fc.crop_faces(mixed_batch(), det, on_no_face="skip")
    assert r.crops.shape == (2, 512, 512, 3) and r.masks.shape == (5, 512, 512)
    assert [rec["crop_index"] for rec in r.records] == [0, None, None, 1, None]
    assert [rec["fallback"] for rec in r.records] == [None, "skipped", "skipped", None, "skipped"]
    with pytest.raises(fc.FaceCropError, match="Nothing is left"):
        fc.crop_faces(torch.cat([noise(seed=1), noise(seed=2)]), det, on_no_face="skip")


# ------------------------------------------------------------------------------------------------ odd inputs

def test_channels_grey_grey_alpha_rgba(det):
    img = astronaut()
    grey = (img * torch.tensor([0.299, 0.587, 0.114])).sum(-1, keepdim=True)
    rgba = torch.cat([img, torch.ones_like(grey)], dim=-1)
    la = torch.cat([grey, torch.ones_like(grey)], dim=-1)
    for x in (grey, la, rgba):
        r = fc.crop_faces(x, det)
        assert r.crops.shape == (1, 512, 512, 3) and r.masks.shape == (1, 512, 512)
        assert contains(r.records[0]["face"]["box"], INNER)
    r = fc.crop_faces(grey, det)
    assert torch.equal(r.crops[0, ..., 0], r.crops[0, ..., 2])  # grey stays grey (replicated to RGB)
    # a single image without the batch axis
    assert fc.crop_faces(img[0], det).crops.shape == (1, 512, 512, 3)


@pytest.mark.parametrize("shape", [(1, 1), (32, 32), (300, 700), (700, 300), (33, 1000)])
def test_tiny_and_non_square_faceless(det, shape):
    h, w = shape
    x = noise(h, w)
    r = fc.crop_faces(x, det, on_no_face="center crop")
    s = min(h, w)
    assert r.crops.shape == (1, 512, 512, 3) and r.masks.shape == (1, h, w)
    x1, y1, x2, y2 = r.records[0]["crop"]
    assert x2 - x1 == y2 - y1 == s
    with pytest.raises(fc.FaceCropError, match="No face found"):
        fc.crop_faces(x, det)


def test_non_square_with_face(det):
    img = astronaut()
    wide = torch.full((1, 512, 1200, 3), 0.5)
    wide[:, :, 300:812] = img
    r = fc.crop_faces(wide, det)
    assert r.masks.shape == (1, 512, 1200)
    assert contains(r.records[0]["face"]["box"], [(x + 300, y) for x, y in INNER])
    tall = torch.full((1, 1000, 512, 3), 0.5)
    tall[:, 400:912] = img
    r = fc.crop_faces(tall, det)
    assert contains(r.records[0]["face"]["box"], [(x, y + 400) for x, y in INNER])


def test_4096_image(det):
    # min_face_size 128 keeps this fast (a 4096 px image is searched at 1024 px; the default 40 px would make MTCNN
    # look for 10 px faces there, ~4 s on 2 cores)
    big = resize(astronaut(), 4096, 4096)
    r = fc.crop_faces(big, det, min_face_size=128)
    assert r.crops.shape == (1, 512, 512, 3) and r.masks.shape == (1, 4096, 4096)
    box = r.records[0]["face"]["box"]
    assert contains(box, [(x * 8, y * 8) for x, y in INNER], slack=8)
    assert iou(box, [v * 8 for v in GT_FACE]) > 0.5
    assert_mask_matches_box(r.masks[0], box)
    noisy = noise(4096, 4096)
    r = fc.crop_faces(noisy, det, on_no_face="center crop", size=64, min_face_size=128)
    assert r.crops.shape == (1, 64, 64, 3)


def test_refused_inputs_have_clear_errors(det):
    with pytest.raises(fc.FaceCropError, match="5 channels"):
        fc.crop_faces(torch.rand(1, 64, 64, 5), det)
    with pytest.raises(fc.FaceCropError, match="empty"):
        fc.crop_faces(torch.rand(0, 64, 64, 3), det)
    with pytest.raises(fc.FaceCropError, match="empty"):
        fc.crop_faces(torch.rand(1, 0, 64, 3), det)
    with pytest.raises(fc.FaceCropError, match="IMAGE tensor"):
        fc.crop_faces(torch.rand(64, 64), det)
    with pytest.raises(fc.FaceCropError, match="on_no_face"):
        fc.crop_faces(astronaut(), det, on_no_face="ignore")
    with pytest.raises(fc.FaceCropError, match="unknown detector"):
        fc.get_detector("haar")


# ------------------------------------------------------------------------------------------------ detectors

def test_auto_without_insightface_is_mtcnn(tmp_path):
    if fc.insightface_available():
        pytest.skip("insightface is installed here")
    assert fc.get_detector("auto", insightface_roots=[str(tmp_path)]).name == "mtcnn"
    with pytest.raises(fc.DetectorUnavailable, match="pip install insightface"):
        fc.get_detector("insightface", insightface_roots=[str(tmp_path)])


def test_detectors_are_imported_lazily():
    """Importing the core module (and so the node) pulls in neither insightface nor facenet-pytorch."""
    import subprocess

    code = ("import sys, invadapter_core.face.detect; "
            "print(sorted(m for m in ('insightface', 'onnxruntime', 'facenet_pytorch') if m in sys.modules))")
    root = os.path.join(os.path.dirname(__file__), "..")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _touch(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"not a real model")


ANTELOPE = ["1k3d68.onnx", "2d106det.onnx", "genderage.onnx", "glintr100.onnx", "scrfd_10g_bnkps.onnx"]


def test_insightface_models_found_in_the_usual_layout(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for f in ANTELOPE:
        _touch(str(b / "models" / "antelopev2" / f))
    assert fc.find_insightface_models([str(a), str(b)], "antelopev2") == str(b)
    with pytest.raises(fc.InsightFaceModelsMissing):
        fc.find_insightface_models([str(a), str(b)], "buffalo_l")


def test_insightface_missing_models_message(tmp_path):
    root = tmp_path / "insightface"
    other = tmp_path / "elsewhere"
    with pytest.raises(fc.InsightFaceModelsMissing) as e:
        fc.find_insightface_models([str(root), str(other)], "antelopev2")
    msg = str(e.value)
    assert str(root / "models" / "antelopev2") in msg and str(other / "models" / "antelopev2") in msg
    assert "Expected layout" in msg and os.path.join("models", "antelopev2", "scrfd_10g_bnkps.onnx") in msg
    assert "never downloads" in msg and "mtcnn" in msg and "Found:" not in msg


def test_insightface_nested_folder_mistake(tmp_path):
    root = tmp_path / "insightface"
    for f in ANTELOPE:
        _touch(str(root / "models" / "antelopev2" / "antelopev2" / f))
    with pytest.raises(fc.InsightFaceModelsMissing) as e:
        fc.find_insightface_models([str(root)], "antelopev2")
    msg = str(e.value)
    nested = str(root / "models" / "antelopev2" / "antelopev2")
    assert "one folder too deep" in msg and nested in msg and "move them up" in msg
    assert "holds no .onnx" not in msg


def test_insightface_other_misplacements(tmp_path):
    root = tmp_path / "insightface"
    _touch(str(root / "buffalo_l" / "det_10g.onnx"))              # models/ level missing
    _touch(str(root / "models" / "buffalo_l.zip"))                # archive not extracted
    with pytest.raises(fc.InsightFaceModelsMissing) as e:
        fc.find_insightface_models([str(root)], "buffalo_l")
    msg = str(e.value)
    assert f"{root / 'buffalo_l'}{os.sep} but belong in {root / 'models' / 'buffalo_l'}" in msg
    assert "buffalo_l.zip is not extracted" in msg
    assert os.path.join("models", "buffalo_l", "det_10g.onnx") in msg
    # an empty model folder
    os.makedirs(root / "models" / "buffalo_l")
    with pytest.raises(fc.InsightFaceModelsMissing, match="exists but holds no .onnx"):
        fc.find_insightface_models([str(root)], "buffalo_l")


def test_auto_falls_back_when_insightface_models_are_misplaced(tmp_path):
    root = tmp_path / "insightface"
    _touch(str(root / "models" / "antelopev2" / "antelopev2" / "scrfd_10g_bnkps.onnx"))
    assert fc.get_detector("auto", insightface_roots=[str(root)]).name == "mtcnn"


def test_insightface_adapter_with_a_stand_in_package(tmp_path, monkeypatch):
    """No real InsightFace here (no package, no models, no downloads): a stand-in ``insightface.app.FaceAnalysis``
    with the real API's shape checks what the adapter passes in and how it reads the faces back."""
    import importlib.machinery
    import types

    calls = {}

    class StandInFace:
        def __init__(self, bbox, kps, det_score):
            self.bbox, self.kps, self.det_score = np.asarray(bbox, np.float32), np.asarray(kps, np.float32), det_score

    class FaceAnalysis:
        def __init__(self, name, root, allowed_modules=None, **kwargs):
            calls["init"] = dict(name=name, root=root, allowed_modules=allowed_modules, **kwargs)
            if not os.path.exists(os.path.join(root, "models", name, "scrfd_10g_bnkps.onnx")):
                raise AssertionError  # the real class asserts 'detection' in self.models

        def prepare(self, ctx_id=0, det_thresh=0.5, det_size=None):
            calls["prepare"] = dict(ctx_id=ctx_id, det_thresh=det_thresh, det_size=det_size)

        def get(self, img, max_num=0, det_metric="default"):
            calls["get"] = img
            return [StandInFace([100, 50, 180, 150], [[120, 90], [160, 90], [140, 110], [125, 130], [155, 130]], 0.87),
                    StandInFace([10, 10, 30, 30], np.zeros((5, 2)), 0.6)]  # 20 px: under min_face_size

    for name in ("insightface", "insightface.app", "onnxruntime"):
        mod = types.ModuleType(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
        monkeypatch.setitem(sys.modules, name, mod)
    sys.modules["insightface.app"].FaceAnalysis = FaceAnalysis
    sys.modules["insightface"].app = sys.modules["insightface.app"]
    assert fc.insightface_available()

    root = tmp_path / "insightface"
    _touch(str(root / "models" / "antelopev2" / "scrfd_10g_bnkps.onnx"))
    detector = fc.get_detector("auto", insightface_roots=[str(tmp_path / "empty"), str(root)], device="cpu")
    assert detector.name == "insightface:antelopev2"
    assert calls["init"]["root"] == str(root) and calls["init"]["name"] == "antelopev2"
    assert calls["init"]["allowed_modules"] == ["detection"]
    assert calls["init"]["providers"] == ["CPUExecutionProvider"]
    assert calls["prepare"] == dict(ctx_id=-1, det_thresh=fc.INSIGHTFACE_MIN_SCORE, det_size=(640, 640))

    img = torch.zeros(1, 200, 300, 3)
    img[..., 0] = 1.0  # pure red: the detector must get BGR
    r = fc.crop_faces(img, detector, size=64)
    assert calls["get"].shape == (200, 300, 3) and calls["get"].dtype == np.uint8
    assert calls["get"][0, 0].tolist() == [0, 0, 255]
    rec = r.records[0]
    assert len(rec["faces"]) == 1 and rec["detector"] == "insightface:antelopev2"
    assert rec["face"]["box"] == [100.0, 50.0, 180.0, 150.0] and rec["face"]["score"] == pytest.approx(0.87)
    assert rec["face"]["landmarks"][0] == [120.0, 90.0]
    assert_mask_matches_box(r.masks[0], rec["face"]["box"])

    # an explicit choice with GPU asks for the CUDA provider first, on that device's index (a torchrun process's own)
    fc.get_detector("insightface", insightface_roots=[str(root)], device="cuda:1")
    assert calls["init"]["providers"] == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    assert calls["prepare"]["ctx_id"] == 1
    # .onnx files without a detection model among them
    other = tmp_path / "other"
    _touch(str(other / "models" / "buffalo_l" / "w600k_r50.onnx"))
    with pytest.raises(fc.InsightFaceModelsMissing, match="no face detection model"):
        fc.get_detector("insightface", insightface_roots=[str(other)], insightface_model="buffalo_l")


# ------------------------------------------------------------------------------------------------ the node

def test_node_registered_and_runs(pack):
    import comfy.model_management
    import folder_paths
    from comfy_api.latest import io

    face_crop = __import__(pack.__name__ + ".nodes.face_crop", fromlist=["NODES"])
    node_cls = face_crop.InvAdapterFaceCrop
    assert node_cls in pack.nodes.all_nodes()
    schema = node_cls.define_schema()
    assert schema.node_id == "InvAdapterFaceCrop"
    assert [o.io_type for o in schema.outputs] == ["IMAGE", "MASK", "INVADAPTER_FACE_BOXES", "STRING"]
    assert os.path.join(folder_paths.models_dir, "insightface") in folder_paths.get_folder_paths("insightface")

    batch = torch.cat([astronaut(), noise()])
    kw = dict(detector="auto", insightface_model="antelopev2", device="cpu", face="largest", face_index=0,
              margin=0.5, min_face_size=40, size=256)
    out = node_cls.execute(batch, on_no_face="center crop", **kw)
    assert isinstance(out, io.NodeOutput)
    crops, masks, boxes, text = out.args
    assert crops.shape == (2, 256, 256, 3) and masks.shape == (2, 512, 512)
    assert json.loads(text) == list(boxes) and len(boxes) == 2
    assert boxes[0]["face"] is not None and boxes[1]["fallback"] == "center crop"
    with pytest.raises(ValueError, match="batch image 1 of 2"):
        node_cls.execute(batch, on_no_face="error", **kw)
    # interruption is checked per image
    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            node_cls.execute(batch, on_no_face="center crop", **kw)
    finally:
        comfy.model_management.interrupt_current_processing(False)


# ------------------------------------------------------------------------------------------------ through the server

def _png_bytes(array: np.ndarray) -> bytes:
    import io as _io

    from PIL import Image

    buf = _io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _face_crop_graph(image_name: str, on_no_face: str = "error", size: int = 256) -> dict:
    return {
        "load": {"class_type": "LoadImage", "inputs": {"image": image_name}},
        "crop": {"class_type": "InvAdapterFaceCrop", "inputs": {
            "image": ["load", 0], "detector": "auto", "insightface_model": "antelopev2", "device": "cpu",
            "face": "largest", "face_index": 0, "margin": 0.5, "min_face_size": 40, "size": size,
            "on_no_face": on_no_face}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["crop", 0], "filename_prefix": "facecrop-test"}},
        "mask": {"class_type": "MaskToImage", "inputs": {"mask": ["crop", 1]}},
        "save_mask": {"class_type": "SaveImage", "inputs": {"images": ["mask", 0], "filename_prefix": "facemask"}},
    }


def _image_nodes(entry) -> list:
    """The output nodes that produced images, in the order the client's images() returns them."""
    return [k for k in sorted(entry["outputs"], key=str) if entry["outputs"][k].get("images")]


def test_face_crop_through_the_server(comfy_client):
    """The shipped demo photo through a real headless ComfyUI: LoadImage -> InvAdapterFaceCrop -> SaveImage."""
    import io as _io

    from PIL import Image
    from support.server import ExecutionFailed, PromptRejected

    assert "InvAdapterFaceCrop" in comfy_client.object_info()
    asset = os.path.join(os.path.dirname(__file__), "..", "assets", "face.png")
    name = comfy_client.upload_image(asset, name="invadapter-face.png")
    entry = comfy_client.run(_face_crop_graph(name))
    prompt_id = entry["prompt_id"]
    images = {node: entry["outputs"][node]["images"][0]["filename"] for node in ("save", "save_mask")}
    files = dict(zip(_image_nodes(entry), comfy_client.images(prompt_id)))
    crop = np.array(Image.open(_io.BytesIO(files["save"])))
    mask = np.array(Image.open(_io.BytesIO(files["save_mask"])).convert("L"))
    assert crop.shape == (256, 256, 3) and images["save"].startswith("facecrop-test")
    assert mask.shape == (288, 288)
    ys, xs = np.nonzero(mask > 127)
    assert contains((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1), [(x - 96, y) for x, y in INNER])

    # a faceless image: the default refuses with the batch index; "center crop" goes through
    noise_name = comfy_client.upload_image(_png_bytes((np.random.default_rng(0).random((96, 128, 3)) * 255)
                                                      .astype(np.uint8)), name="invadapter-noise.png")
    with pytest.raises(ExecutionFailed, match="No face found in batch image 0 of 1"):
        comfy_client.run(_face_crop_graph(noise_name))
    entry = comfy_client.run(_face_crop_graph(noise_name, on_no_face="center crop", size=64))
    files = dict(zip(_image_nodes(entry), comfy_client.images(entry["prompt_id"])))
    assert np.array(Image.open(_io.BytesIO(files["save"]))).shape == (64, 64, 3)
    # the fallback is said where API users look, not only in the server log
    notices = [text for out in entry["outputs"].values() for text in out.get("text", [])]
    assert any("No face found" in t and "centre square" in t for t in notices), entry["outputs"]
    # an out-of-range widget is refused at validation (HTTP 400)
    with pytest.raises(PromptRejected):
        comfy_client.queue(_face_crop_graph(name, on_no_face="ignore"))


def test_insightface_sessions_run_on_the_processs_own_gpu():
    """--face-device gpu under torchrun: each process's ONNX sessions take its device's index (LOCAL_RANK's GPU, as
    ComfyUI's device), never a fixed GPU 0; the CPU keeps the CPU provider alone."""
    assert fc.onnx_gpu("cpu") is None and fc.onnx_providers(None) == ["CPUExecutionProvider"]
    assert fc.onnx_gpu(torch.device("cuda", 3)) == 3
    assert fc.onnx_providers(3) == [("CUDAExecutionProvider", {"device_id": 3}), "CPUExecutionProvider"]
    if not torch.cuda.is_available():  # an index-less CUDA device is the current one; without CUDA that is 0
        assert fc.onnx_gpu("cuda") == 0
