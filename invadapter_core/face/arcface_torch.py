"""ArcFace as a differentiable torch module: an InsightFace recognition ONNX file (antelopev2's ``glintr100.onnx``,
buffalo_l's ``w600k_r50.onnx``, or any one-input ArcFace graph) converted by ``onnx2torch``, for the trainer's
identity loss (``train.identity``). Frozen: no parameter requires grad; gradients flow to the input only.

Input conventions copied from InsightFace's ``ArcFaceONNX``: the network sees RGB (InsightFace hands it OpenCV's BGR
crops through ``blobFromImages(..., swapRB=True)``), 0..255 pixels normalised as (x - 127.5) / 127.5, unless the
graph's first eight nodes hold a Sub and a Mul (named ``Sub*``/``_minus*`` and ``Mul*``/``_mul*``): then the graph
normalises itself and gets the raw 0..255 pixels. The face is expected roughly aligned and filling the 112 px square
(InsightFace aligns it by five keypoints; the trainer's crops are face-centred squares, see ``train.identity``).
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch
import torch.nn.functional as F

INSIGHTFACE_MEAN, INSIGHTFACE_STD = 127.5, 127.5
INSTALL_HINT = "pip install onnx2torch==1.5.15 onnx==1.23.2 (the trainer's extra: pyproject.toml [train])"


class ArcFaceFileError(ValueError):
    """A recognition model file that cannot be used: one line naming the file and the fix."""


def read_graph(path: str):
    """The ONNX model at ``path``, with its one image input checked ([N, 3, H, W]); ArcFaceFileError otherwise."""
    model, why = _read(path)
    if why:
        raise ArcFaceFileError(f"{path}: {why}")
    return model


def recognizer_problem(path: str) -> Optional[str]:
    """Why ``path`` is not a usable recognition model (its packages included); None: it is one."""
    why = _read(path)[1]
    if why is None and importlib.util.find_spec("onnx2torch") is None:
        why = f"the identity loss's ArcFace needs the 'onnx2torch' package: {INSTALL_HINT}"
    return why


def _read(path: str):
    """(model, None), or (None, why not) for a file that is no ONNX face recognizer."""
    if not os.path.isfile(path):
        return None, (f"{'is not a file' if os.path.exists(path) else 'does not exist'}; point it at an InsightFace "
                      f"recognition model (e.g. <insightface>/models/antelopev2/glintr100.onnx or "
                      f"models/buffalo_l/w600k_r50.onnx)")
    try:
        import onnx
    except ImportError:
        return None, f"the identity loss's ArcFace needs the 'onnx' package: {INSTALL_HINT}"
    try:
        model = onnx.load(path)
    except Exception as e:  # noqa: BLE001 - protobuf's parse errors have no common base: any of them is the file's
        return None, (f"not a readable ONNX model ({type(e).__name__}: {_one_line(e, 120)}); give an InsightFace "
                      f"recognition .onnx file")
    inputs = _image_inputs(model)
    dims = input_dims(model) if len(inputs) == 1 else []
    if len(inputs) != 1 or len(dims) != 4 or dims[1] not in (3, None) or len(model.graph.output) < 1:
        return None, (f"not a face recognition model (expected one image input [N, 3, H, W] and an embedding "
                      f"output, found {len(inputs)} input(s) of shape {dims or '?'}); give an InsightFace "
                      f"recognition model such as glintr100.onnx, not the detector")
    return model, None


def _one_line(error: Exception, limit: int) -> str:
    return " ".join(str(error).split())[:limit]


def _image_inputs(model) -> list:
    """The graph's real inputs (older exports list their weights among the inputs too)."""
    weights = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in weights]


def input_dims(model) -> list[Optional[int]]:
    """The first input's dimensions, None where dynamic."""
    return [d.dim_value if d.HasField("dim_value") else None
            for d in _image_inputs(model)[0].type.tensor_type.shape.dim]


def input_normalisation(model) -> tuple[float, float]:
    """(mean, std) of the 0..255 pixels, InsightFace's rule: a graph that subtracts and multiplies in its first eight
    nodes normalises itself."""
    names = [n.name for n in model.graph.node[:8]]
    sub = any(n.startswith(("Sub", "_minus")) for n in names)
    mul = any(n.startswith(("Mul", "_mul")) for n in names)
    return (0.0, 1.0) if sub and mul else (INSIGHTFACE_MEAN, INSIGHTFACE_STD)


class TorchArcFace(torch.nn.Module):
    """RGB face crops [B, 3, H, W] in 0..1 -> embeddings [B, E] (not normalised), differentiable in the input."""

    def __init__(self, net: torch.nn.Module, size: tuple[int, int], mean: float, std: float, name: str):
        super().__init__()
        self.net, self.size, self.mean, self.std, self.name = net, size, mean, std, name
        self.requires_grad_(False)
        self.eval()

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        if tuple(rgb.shape[-2:]) != self.size:
            rgb = F.interpolate(rgb, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        x = (rgb * 255.0 - self.mean) / self.std
        out = self.net(x)
        return (out[0] if isinstance(out, (tuple, list)) else out).flatten(1)


def load_arcface(path: str, device: Optional[torch.device] = None) -> TorchArcFace:
    """The recognition ONNX at ``path`` as a frozen ``TorchArcFace`` on ``device`` (float32)."""
    model = read_graph(path)
    try:
        from onnx2torch import convert
    except ImportError:
        raise ArcFaceFileError(f"the identity loss's ArcFace needs the 'onnx2torch' package: {INSTALL_HINT}") from None
    try:
        net = convert(model)
    except Exception as e:  # noqa: BLE001 - an op onnx2torch does not know: say which file and why
        raise ArcFaceFileError(f"{path}: onnx2torch cannot convert it ({type(e).__name__}: {_one_line(e, 160)}); "
                               f"give an InsightFace ArcFace model (glintr100.onnx, w600k_r50.onnx)") from None
    dims = input_dims(model)
    size = (dims[2] or 112, dims[3] or 112)  # a dynamic size: ArcFace's 112 px
    mean, std = input_normalisation(model)
    return TorchArcFace(net.float(), size, mean, std, os.path.basename(path)).to(device or "cpu")
