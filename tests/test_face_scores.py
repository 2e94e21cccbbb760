"""invadapter_core.face.scores and score_overlay on real photos (fetched at test time, see support/faces.py): a batch
scored against one identity, faceless images marked, several references, the top-k selection, the overlay."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from invadapter_core.face import detect as face_core
from invadapter_core.face import recognize as face_id
from invadapter_core.face import scores as face_scores
from invadapter_core.face.overlay import draw_scores

pytest.importorskip("dlib", reason="pip install dlib-bin face-recognition-models (requirements-dev.txt)")


def test_batch_scores_mark_faceless_images_and_select_best(photos, dlib_recognizer):
    det = face_core.get_detector("mtcnn")
    crops = torch.cat([face_core.crop_faces(photos[n], det, size=192).crops for n in ("obama2", "biden", "obama3")])
    noise = torch.rand(1, 192, 192, 3, generator=torch.Generator().manual_seed(0))
    batch = torch.cat([crops[:2], noise, crops[2:]])
    references = torch.cat([face_core.crop_faces(photos["obama"], det, size=192).crops, noise])  # one without face
    scores = face_scores.score_batch(dlib_recognizer.get(), references, batch)
    assert scores.references_used == [0] and scores.references_without_face == [1]
    s = scores.similarity
    assert s[0] > 0.5 > s[1] and math.isnan(s[2]) and s[3] > 0.5
    assert scores.without_face == [2] and scores.faces[2] is None and scores.faces[0]["box"]
    text = scores.summary()
    assert "image 2: no face" in text and "references without a face (not used): 1" in text
    assert "dlib" in text and "distance" in text and "same person" in text
    records = scores.records()
    assert records[2]["similarity"] is None and records[2]["face_found"] is False
    assert records[1]["verdict"] == "different" and records[0]["distance"] < 0.6

    assert face_scores.select_best(scores, 2) == sorted([0, 3], key=lambda i: -s[i])
    assert face_scores.select_best(scores, 10) == sorted([0, 3], key=lambda i: -s[i]) + [1]  # never the faceless one
    assert face_scores.select_best(scores, 4, skip_no_face=False)[-1] == 2  # ranked last
    faceless = face_scores.score_batch(dlib_recognizer.get(), references, noise.expand(2, -1, -1, -1))
    with pytest.raises(face_id.FaceIdError, match="none of the 2 images has a face"):
        face_scores.select_best(faceless, 1)
    with pytest.raises(face_id.FaceIdError, match="no face found in the reference image"):
        face_scores.score_batch(dlib_recognizer.get(), noise, batch)

    # several references: mean of the similarities, or the best match
    two = torch.cat([references[:1], face_core.crop_faces(photos["biden"], det, size=192).crops])
    mean = face_scores.score_batch(dlib_recognizer.get(), two, crops[:1], combine="mean")
    best = face_scores.score_batch(dlib_recognizer.get(), two, crops[:1], combine="max")
    assert mean.similarity[0] == pytest.approx(np.mean(mean.per_reference[0]))
    assert best.similarity[0] == pytest.approx(max(best.per_reference[0]))
    assert best.similarity[0] > mean.similarity[0]


def test_overlay_writes_scores_and_boxes_faces(photos, dlib_recognizer):
    det = face_core.get_detector("mtcnn")
    crops = torch.cat([face_core.crop_faces(photos[n], det, size=192).crops for n in ("obama2", "biden")])
    noise = torch.rand(1, 192, 192, 3, generator=torch.Generator().manual_seed(1))
    batch = torch.cat([crops, noise])
    reference = face_core.crop_faces(photos["obama"], det, size=192).crops
    scores = face_scores.score_batch(dlib_recognizer.get(), reference, batch)
    before = batch.clone()
    overlay = draw_scores(batch, scores)
    assert torch.equal(batch, before)  # the input is never drawn on
    assert overlay.shape == (3, 192, 192, 3) and overlay.dtype == torch.float32
    pixels = (overlay * 255).round().to(torch.uint8).numpy()
    for i, colour in ((0, (40, 200, 90)), (1, (235, 70, 55))):  # green: same person; red: another
        x1, y1, x2, y2 = scores.faces[i]["box"]
        edge = pixels[i, int(y1) - 1:int(y1) + 2, int(x1) + 5:int(x2) - 5].reshape(-1, 3)
        assert (edge == colour).all(axis=1).any(), f"image {i}: no box edge of colour {colour}"
        corner = pixels[i, :20, :40].reshape(-1, 3)
        assert (corner == colour).all(axis=1).any() and (corner == 0).all(axis=1).any()  # text on black
    grey = pixels[2, :20, :60].reshape(-1, 3)
    assert (grey == (160, 160, 160)).all(axis=1).any()  # "no face"
    assert np.abs(pixels[2, 40:] - (before[2, 40:].numpy() * 255).round()).max() <= 1  # nothing drawn elsewhere
    with pytest.raises(ValueError, match="2 images but 3 scores"):
        draw_scores(batch[:2], scores)
