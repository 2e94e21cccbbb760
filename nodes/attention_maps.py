import torch
import torch.nn.functional as F
from comfy_api.latest import io

import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
from invadapter_core.adapter.attention_maps import (RECORDER_KEY, AttentionRecorder, heat_overlay, output_maps,
                                            reference_maps)
from invadapter_core.arch.levels import LEVELS, PRESETS
from invadapter_core.adapter.application import applications

from .finite import finite_floats
from .types import CATEGORY

LEVEL_CHOICES = ["all", "coarse", "fine"] + list(LEVELS)


class InvAdapterAttentionMaps(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InvAdapterAttentionMaps",
            display_name="Inv-Adapter Attention Maps",
            category=CATEGORY,
            search_aliases=["attention map", "heatmap", "visualize identity", "debug", "where does it look",
                            "inv-adapter"],
            description="Samples like KSampler and shows where the generation attends in the reference face "
                        "(reference_overlay, maps summing to one) and where the reference acts on the output "
                        "(output_overlay), for a chosen step range and block levels.",
            inputs=[
                io.Model.Input("model", tooltip="A model with InvAdapterApply on it."),
                io.Conditioning.Input("positive", tooltip="The positive prompt, as for KSampler."),
                io.Conditioning.Input("negative", tooltip="The negative prompt, as for KSampler."),
                io.Latent.Input("latent_image", tooltip="The latent to sample (Empty Latent Image)."),
                io.Vae.Input("vae", tooltip="Decodes the result, so the output overlay can be drawn on it."),
                io.Image.Input("reference_image", tooltip="The face crop(s) the reference was encoded from."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="Noise seed, as for KSampler."),
                io.Int.Input("steps", default=20, min=1, max=10000,
                             tooltip="Sampling steps (the reference's inversion steps reuse every feature)."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1,
                               tooltip="Classifier-free guidance scale, as for KSampler."),
                io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES,
                               tooltip="Sampler, as for KSampler."),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="simple",
                               tooltip="Scheduler, as for KSampler."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="First part of sampling whose attention is recorded (0 = first step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Last part of sampling whose attention is recorded (1 = last step)."),
                io.Combo.Input("levels", options=LEVEL_CHOICES, default="all",
                               tooltip="Which UNet levels to record: all, the coarse or fine preset's levels, or "
                                       "one level."),
            ],
            outputs=[io.Latent.Output(display_name="latent", tooltip="The sampled latent, as KSampler's."),
                     io.Image.Output(display_name="reference_overlay",
                                     tooltip="Heat map on the reference face: where the generation attends."),
                     io.Image.Output(display_name="output_overlay",
                                     tooltip="Heat map on the generated image: where the reference acts."),
                     io.Mask.Output(display_name="reference_maps",
                                    tooltip="The raw reference maps (each sums to one over the reference).")],
        )

    @classmethod
    @finite_floats
    def execute(cls, model, positive, negative, latent_image, vae, reference_image, seed, steps, cfg, sampler_name,
                scheduler, start_percent, end_percent, levels) -> io.NodeOutput:
        apps = applications(model)
        if not apps:
            raise ValueError("the model has no Inv-Adapter applied: connect the MODEL output of InvAdapterApply")
        if start_percent > end_percent:
            raise ValueError(f"start_percent ({start_percent}) is after end_percent ({end_percent}): no sampling step "
                             f"lies in that range, so there is nothing to record; set start_percent below end_percent")
        ms = model.get_model_object("model_sampling")
        recorder = AttentionRecorder(levels=_levels(levels), sigma_start=ms.percent_to_sigma(start_percent),
                                     sigma_end=ms.percent_to_sigma(end_percent))
        m = model.clone()
        m.model_options["transformer_options"][RECORDER_KEY] = recorder
        latent = comfy.sample.fix_empty_latent_channels(m, latent_image["samples"])
        noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
        callback = latent_preview.prepare_callback(m, steps)
        samples = comfy.sample.sample(m, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                                      noise_mask=latent_image.get("noise_mask"), callback=callback, seed=seed)
        decoded = vae.decode(samples)
        decoded = decoded.reshape(-1, *decoded.shape[-3:])
        ref_over, out_over, maps = [], [], []
        for app in apps:
            if app.key not in recorder.reference:
                raise ValueError(f"nothing was recorded for this reference: {_why_nothing(app, recorder)}")
            ref = app.reference
            face_hw = tuple(reference_image.shape[1:3])
            rmap = reference_maps(recorder.reference[app.key], ref.images, tuple(ref.states.shape[-2:]), face_hw)
            faces = _side_by_side(reference_image, ref.images)
            ref_over.append(heat_overlay(faces.expand(rmap.shape[0], -1, -1, -1), rmap))
            maps.append(rmap)
            out_over.append(heat_overlay(decoded, output_maps(recorder.output[app.key], tuple(decoded.shape[1:3]))))
        out = latent_image.copy()
        out["samples"] = samples
        return io.NodeOutput(out, _cat(ref_over), _cat(out_over), _cat(maps))


def _why_nothing(app, recorder: AttentionRecorder) -> str:
    """The reason a reference's self-attention EAA never ran where the recorder was listening."""
    wanted = recorder.levels or set(app.injection.levels.values())
    strengths = [s for (kind, name), s in app.injection.scales.items()
                 if kind == "self" and app.injection.levels[name] in wanted]
    if not any(strengths):
        return (f"its self-attention strength is 0 at the chosen levels ({', '.join(sorted(wanted))}): raise "
                f"weight_self or the block weights there, or choose other levels")
    if app.sigma_start < recorder.sigma_end or app.sigma_end > recorder.sigma_start:
        return ("InvAdapterApply's start_percent/end_percent and this node's step range do not overlap: widen one "
                "of them")
    return "no sampling step fell in the chosen step range: widen it or raise the number of steps"


def _levels(choice: str):
    if choice == "all":
        return None
    if choice in PRESETS:
        return {lv for lv, w in PRESETS[choice].items() if w > 0}
    return {choice}


def _side_by_side(images: torch.Tensor, count: int) -> torch.Tensor:
    """The reference's photos in one row, as the maps lay them out: [1, H, count * W, 3]."""
    imgs = images[:count] if images.shape[0] >= count else images[:1].expand(count, -1, -1, -1)
    return torch.cat(list(imgs), dim=1)[None]


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One batch from several identities' maps (resized to the first one's size where they differ)."""
    size = tensors[0].shape[1:3]
    same = []
    for t in tensors:
        if t.shape[1:3] != size:
            chw = t.movedim(-1, 1) if t.ndim == 4 else t[:, None]
            chw = F.interpolate(chw, size=tuple(size), mode="bilinear", align_corners=False)
            t = chw.movedim(1, -1) if t.ndim == 4 else chw[:, 0]
        same.append(t)
    return torch.cat(same)


NODES = [InvAdapterAttentionMaps]
