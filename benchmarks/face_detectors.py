"""Face detector comparison behind the choice in invadapter_core/face.py (quality on bundled images, CPU time).

    .venv/bin/python benchmarks/face_detectors.py [--extra-path DIR ...]

Always measures the pack's MTCNN detector. OpenCV 4 Haar cascades (``opencv-python-headless<5``) and mediapipe
0.10.21's BlazeFace models are measured when importable; they are not dependencies of the pack, so install them
into a scratch folder (``pip install --target DIR --no-deps ...``) and pass ``--extra-path DIR``.

Data, all shipped inside scikit-image (needs ``scikit-image``): 17 variants of ``astronaut()`` with the face's
eye and mouth positions known (a hit = a box holding both eyes and the mouth), the 100 faces / 100 non-faces of
``lfw_subset()`` (25 px crops, edge-padded to 75 px, upscaled to 300 px), and 16 images without a face.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EYES_MOUTH = [(202, 101), (245, 103), (224, 145)]


def datasets():
    import skimage.data as d
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(0)
    ast = d.astronaut()

    def pil(a):
        return Image.fromarray(a)

    def affine(m, pts):
        m = np.asarray(m, float)[:2]
        return [tuple(m @ np.array([x, y, 1.0])) for x, y in pts]

    eye = np.eye(3)
    pos = [("orig", ast, affine(eye, EYES_MOUTH))]
    for s in (0.5, 0.3, 0.2):
        w = int(512 * s)
        pos.append((f"scale{s}", np.array(pil(ast).resize((w, w), Image.BILINEAR)), affine(np.diag([s, s, 1]), EYES_MOUTH)))
    for ang in (-30, -20, -10, 10, 20, 30):
        r = pil(ast).rotate(ang, resample=Image.BILINEAR, center=(228, 130))
        a = np.deg2rad(ang)  # PIL rotates counter-clockwise about the centre, y pointing down
        c, s_ = np.cos(a), np.sin(a)
        m = np.array([[c, s_, 228 - c * 228 - s_ * 130], [-s_, c, 130 + s_ * 228 - c * 130], [0, 0, 1]])
        pos.append((f"rot{ang}", np.array(r), affine(m, EYES_MOUTH)))
    pos.append(("dark", (ast * 0.35).astype(np.uint8), affine(eye, EYES_MOUTH)))
    pos.append(("noise", np.clip(ast + rng.normal(0, 25, ast.shape), 0, 255).astype(np.uint8), affine(eye, EYES_MOUTH)))
    buf = io.BytesIO()
    pil(ast).save(buf, "JPEG", quality=10)
    pos.append(("jpeg10", np.array(Image.open(buf)), affine(eye, EYES_MOUTH)))
    pos.append(("blur", np.array(pil(ast).filter(ImageFilter.GaussianBlur(3))), affine(eye, EYES_MOUTH)))
    pos.append(("grey", np.repeat(np.array(pil(ast).convert("L"))[..., None], 3, 2), affine(eye, EYES_MOUTH)))
    pos.append(("mirror", ast[:, ::-1].copy(), affine([[-1, 0, 511], [0, 1, 0], [0, 0, 1]], EYES_MOUTH)))
    big = np.full((2048, 2048, 3), 200, np.uint8)
    big[1000:1512, 700:1212] = ast
    pos.append(("in2048", big, affine([[1, 0, 700], [0, 1, 1000], [0, 0, 1]], EYES_MOUTH)))

    faces, nonfaces = [], []
    for i, f in enumerate(d.lfw_subset()):
        a = np.pad((np.clip(f, 0, 1) * 255).astype(np.uint8), 25, mode="edge")
        a = np.repeat(np.array(pil(a).resize((300, 300), Image.BICUBIC))[..., None], 3, 2)
        (faces if i < 100 else nonfaces).append(a)

    negs = {"coffee": d.coffee(), "chelsea (cat)": d.chelsea(), "rocket": d.rocket(), "hubble": d.hubble_deep_field(),
            "retina": d.retina(), "astronaut lower half": ast[300:].copy(),
            "noise": (rng.random((512, 512, 3)) * 255).astype(np.uint8), "logo": d.logo()[..., :3]}
    for n in ("brick", "grass", "gravel", "moon", "coins", "horse", "page", "text"):
        g = getattr(d, n)()
        g = (g * 255).astype(np.uint8) if g.dtype == bool else g
        negs[n] = np.repeat(g[..., None], 3, 2)
    return pos, faces, nonfaces, negs


def detectors():
    """name -> f(uint8 RGB) -> [(x1, y1, x2, y2, score)]; unavailable ones are reported and left out."""
    found = {}
    sys.path.insert(0, ROOT)
    from invadapter_core.face.detect import MTCNNDetector

    mt = MTCNNDetector("cpu")
    found["mtcnn (pack)"] = lambda img: [f.box + (f.score,) for f in mt.detect(img, 20)]
    try:
        import cv2

        def haar(file, neighbours):
            c = cv2.CascadeClassifier(cv2.data.haarcascades + file)

            def f(img):
                g = cv2.equalizeHist(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY))
                r, _, w = c.detectMultiScale3(g, 1.1, neighbours, minSize=(24, 24), outputRejectLevels=True)
                return [(x, y, x + ww, y + hh, float(s)) for (x, y, ww, hh), s in zip(r, np.ravel(w))]
            return f

        found[f"opencv {cv2.__version__} haar default"] = haar("haarcascade_frontalface_default.xml", 5)
        found[f"opencv {cv2.__version__} haar alt2"] = haar("haarcascade_frontalface_alt2.xml", 3)
    except Exception as e:  # noqa: BLE001 - a report, not a dependency
        print(f"(opencv haar not measured: {type(e).__name__}: {e})")
    try:
        from mediapipe.python.solutions import face_detection as fd

        for sel, label in ((0, "short"), (1, "full")):
            m = fd.FaceDetection(model_selection=sel, min_detection_confidence=0.5)

            def f(img, m=m):
                h, w = img.shape[:2]
                out = []
                for det in m.process(np.ascontiguousarray(img)).detections or []:
                    b = det.location_data.relative_bounding_box
                    out.append((b.xmin * w, b.ymin * h, (b.xmin + b.width) * w, (b.ymin + b.height) * h, det.score[0]))
                return out
            found[f"mediapipe {label}-range"] = f
    except Exception as e:  # noqa: BLE001
        print(f"(mediapipe not measured: {type(e).__name__}: {e})")
    return found


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--extra-path", action="append", default=[], help="folder with optional detector packages")
    args = ap.parse_args()
    sys.path[:0] = args.extra_path
    import torch

    torch.set_num_threads(2)
    pos, faces, nonfaces, negs = datasets()
    for name, f in detectors().items():
        hits, extra = [], 0
        for label, img, pts in pos:
            boxes = f(img)
            good = [b for b in boxes if all(b[0] <= x <= b[2] and b[1] <= y <= b[3] for x, y in pts)]
            hits.append(label if good else "-" + label)
            extra += len(boxes) - len(good)
        lfw = sum(1 for a in faces if f(a))
        lfw_fp = sum(len(f(a)) for a in nonfaces)
        neg_hits = {k: len(f(a)) for k, a in negs.items()}
        ast = pos[0][1]
        t = time.perf_counter()
        for _ in range(5):
            f(ast)
        t512 = (time.perf_counter() - t) / 5
        print(f"{name}: astronaut variants {sum(not h.startswith('-') for h in hits)}/{len(pos)} "
              f"(missed {[h[1:] for h in hits if h.startswith('-')]}), other boxes on them {extra}; "
              f"LFW faces {lfw}/100; boxes on LFW non-faces {lfw_fp}; boxes on {len(negs)} face-free images "
              f"{sum(neg_hits.values())} {[k for k, v in neg_hits.items() if v]}; 512 px {t512 * 1000:.0f} ms")


if __name__ == "__main__":
    main()
