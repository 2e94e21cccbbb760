"""The evaluation arms, run through the pack's own nodes, and what is measured on their samples.

Every arm sees the same references, target poses and noise: R references (several per identity, each in its own
pose) times K target poses. A reference is encoded by InvAdapterEncodeReference (the pack's DDIM inversion, with
the reference's own pose as its caption); InvAdapterApply installs the adapter; the sampler is ComfyUI's. The
target pose is the prompt, so without an adapter the identity is whatever the base model draws. An adapter with an
identity token (IDAdapter's) also adds its tokens of the reference to the prompt (``token_path``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from invadapter_core.adapter.identity_token import reference_tokens
from invadapter_core.comfyui.host import load_pack

from . import render
from .base import ToyBase
from .classifiers import Judges
from .sampling import SamplerSettings, generate
from .token_path import ToyTextPath


@dataclass
class Plan:
    """Who and where: reference r has identity ``identity[r]`` in pose ``reference_pose[r]``; its K targets are in
    ``target_pose[r]``; its sampling run uses ``seed[r]``."""
    identity: torch.Tensor        # [R] index into the 16 identities
    reference_pose: torch.Tensor  # [R, 11]
    target_pose: torch.Tensor     # [R, K, 11]
    seed: torch.Tensor            # [R]
    more_reference_poses: Optional[torch.Tensor] = None  # [R, K-1, 11] more photos of reference r (unseen.py)

    @property
    def samples(self) -> int:
        return self.target_pose.shape[0] * self.target_pose.shape[1]


def make_plan(identities: int, per_identity: int, poses: int, seed: int) -> Plan:
    gen = torch.Generator().manual_seed(seed)
    r = identities * per_identity
    return Plan(torch.arange(identities).repeat_interleave(per_identity), render.random_poses(r, gen),
                render.random_poses(r * poses, gen).reshape(r, poses, -1),
                torch.randint(0, 2 ** 31 - 1, (r,), generator=gen))


class Evaluation:
    def __init__(self, base: ToyBase, judges: Optional[Judges], plan: Plan, settings: SamplerSettings,
                 inversion: str, log: Callable[[str], None] = print, references: int = 1, combine: str = "concat"):
        """``references`` > 1: each reference is encoded from that many photos of its identity (the plan's
        reference pose, then its ``more_reference_poses``), combined by InvAdapterApply's ``combine``."""
        self.base, self.judges, self.plan, self.settings, self.log = base, judges, plan, settings, log
        self.inversion, self.references, self.combine = inversion, references, combine
        self.pack = load_pack()
        self.reference_images = base.render(plan.identity, plan.reference_pose)  # [R, 3, 32, 32]

    def arms(self, weights: Path) -> list[tuple[str, Optional[object]]]:
        """(name, adapter) of every arm; the adapters come from InvAdapterLoader (the trained one from its file,
        found through the loader's model folder)."""
        loader = self.pack.nodes.loader.InvAdapterLoader
        return [("no adapter", None), ("training-free", loader.execute("init from model").args[0]),
                ("trained", self.load(weights))]

    def load(self, weights: Path):
        """A weights file through InvAdapterLoader: its folder is added to the loader's model folder first."""
        import folder_paths

        folder_paths.add_model_folder_path(self.pack.nodes.folders.ADAPTERS, str(weights.parent))
        return self.pack.nodes.loader.InvAdapterLoader.execute(weights.name).args[0]

    def encode(self, adapter, r: int):
        """InvAdapterEncodeReference on reference r: its image, its own pose as the caption."""
        from comfy_api.latest import io  # noqa: F401  (the node module needs ComfyUI's API loaded)

        node = self.pack.nodes.encode.InvAdapterEncodeReference
        image = self.reference_images[r:r + 1].movedim(1, -1)
        poses = self.plan.reference_pose[r:r + 1]
        if self.references > 1:  # several photos of one identity: one batch, each with its own pose as caption
            poses = torch.cat([poses, self.plan.more_reference_poses[r, :self.references - 1]])
            who = self.plan.identity[r].repeat(len(poses))
            image = self.base.render(who, poses).movedim(1, -1)
        caption = [[self.base.context(poses), {}]]
        out = node.execute(self.base.model, self.base.vae, image, caption, self.settings.steps,
                           self.settings.scheduler, render.SIZE, True, adapter, sampler_name=self.settings.sampler,
                           inversion=self.inversion)
        return out.args[0]

    def apply(self, adapter, reference):
        node = self.pack.nodes.apply.InvAdapterApply
        out = node.execute(self.base.model, adapter, reference, 1.0, 1.0, 0.0, 1.0, self.combine, "cond and uncond")
        return out.args[0]

    def run(self, name: str, adapter) -> tuple[torch.Tensor, dict]:
        """Samples [R*K, 3, 32, 32] and the arm's seconds (encode + sampling)."""
        plan, started, encode_s = self.plan, time.time(), 0.0
        images = []
        for r in range(len(plan.identity)):
            model = self.base.model
            context = self.base.context(plan.target_pose[r])
            if adapter is not None:
                t = time.time()
                reference = self.encode(adapter, r)
                if getattr(adapter, "identity_token", None) is not None:  # the identity token joins the prompt
                    context = ToyTextPath(self.base).context(context, reference_tokens(self.base.model,
                                                                                   adapter.identity_token, reference))
                encode_s += time.time() - t
                model = self.apply(adapter, reference)
            images.append(generate(model, context, self.base.empty_context(), int(plan.seed[r]), self.settings))
        seconds = time.time() - started
        self.log(f"arm {name}: {plan.samples} samples in {seconds:.0f} s (encoding {encode_s:.0f} s)")
        return torch.cat(images), {"seconds": round(seconds, 1), "encode_s": round(encode_s, 1)}

    def score(self, images: torch.Tensor) -> dict:
        plan, judges = self.plan, self.judges
        k = plan.target_pose.shape[1]
        who = plan.identity.repeat_interleave(k)
        p = judges.identity_probabilities(images)
        known = judges.known_identity(images)
        # anti-copy: closer to the reference identity drawn in the target's pose than to the reference image
        in_target_pose = self.base.render(who, plan.target_pose.reshape(-1, render.POSE_DIM))
        reference = self.reference_images.repeat_interleave(k, dim=0)
        mse = lambda a, b: ((a - b) ** 2).mean(dim=(1, 2, 3))  # noqa: E731
        return {
            "identity_accuracy": round(float((p.argmax(-1) == who).float().mean()), 4),
            "mean_p_reference": round(float(p.gather(1, who[:, None]).mean()), 4),
            "known_identity_rate": round(float((known >= 0).float().mean()), 4),
            "strict_reference_rate": round(float((known == who).float().mean()), 4),
            "anti_copy": round(float((mse(images, in_target_pose) < mse(images, reference)).float().mean()), 4),
        }
