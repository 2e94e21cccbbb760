"""The trainer's configuration: one TOML or JSON file with the sections below, plus ``--set section.key=value``.

Every field carries its help text, so ``python -m invadapter_core.train config`` prints a commented TOML file with
all defaults. Relative paths in a config file are taken relative to that file's folder (a config and its data can
move together); paths given with ``--set`` are relative to the current directory.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional


def opt(default, help: str, path: bool = False):
    kw = {"default_factory": lambda: list(default)} if isinstance(default, list) else {"default": default}
    return field(metadata={"help": help, "path": path}, **kw)


@dataclass
class ModelConfig:
    checkpoint: str = opt("", "SD1.x, SD2.x or SDXL-family checkpoint (.safetensors/.ckpt), or a Flux / Chroma / "
                              "Qwen-Image one, loaded with ComfyUI's own loader; frozen. Or leave it empty and give "
                              "the separate files below", path=True)
    diffusion_model: str = opt("", "instead of a checkpoint: the diffusion model file alone (what ComfyUI's Load "
                                   "Diffusion Model loads, e.g. flux1-dev.safetensors)", path=True)
    text_encoders: list = opt([], "with diffusion_model: the text encoder files (Load CLIP / DualCLIPLoader's, e.g. "
                                  "[\"clip_l.safetensors\", \"t5xxl_fp16.safetensors\"])")
    clip_type: str = opt("flux", "with diffusion_model: the text encoders' type as ComfyUI's loaders name it (flux, "
                                 "chroma, qwen_image, sd3, ...)")
    vae: str = opt("", "with diffusion_model: the VAE file (e.g. ae.safetensors)", path=True)
    tokens_m: int = opt(256, "M: reference tokens after the cross-attention token aggregation (paper: 256 or 512)")
    train_self: bool = opt(True, "train the self-attention EAA (W'k, W'v)")
    train_cross: bool = opt(True, "train the cross-attention EAA (W_agg, W''k, W''v)")
    identity_tokens: int = opt(0, "k: IDAdapter's identity token, k token embeddings mapped from the reference's "
                                  "features that enter the prompt through the text encoder, trained jointly with the "
                                  "EAA and saved in the weights file (0: none; needs a text path given to the "
                                  "trainer: the command-line trainer uses the checkpoint's CLIP, SD1.x/2.x)")
    init: str = opt("base", "'base': W'k, W'v copied from the model's own attn1 (the training-free adapter), cross "
                            "EAA a no-op (W''v = 0, W_agg = average pooling); 'random'; or a weights file to "
                            "continue from (the loader's format)", path=True)


@dataclass
class DataConfig:
    source: str = opt("", "a folder of images with a caption .txt beside each, or a .jsonl manifest of "
                          "{\"image\": path, \"caption\": text} lines (paths relative to the manifest), each "
                          "optionally with \"identity\": the person, grouping several photos of one person",
                      path=True)
    cache_dir: str = opt("", "where `preprocess` writes its shards and `train` reads them", path=True)
    resolution: int = opt(512, "reference resolution in pixels (512 for SD1.x, 768 for SD2.x-v, 1024 for SDXL); "
                               "training uses the same size")
    face_crop: str = opt("auto", "'detect': crop the face (images without one are skipped); 'center': centre "
                                 "square; 'auto': detect when a detector is installed, else centre")
    face_detector: str = opt("auto", "invadapter_core.face.detect detector: auto, insightface or mtcnn")
    insightface_root: str = opt("", "folder holding models/<antelopev2|buffalo_l>/ for the InsightFace detector",
                                path=True)
    face_margin: float = opt(0.5, "square side = face box side x (1 + 2 x margin), as in the face crop node")
    min_face_size: int = opt(40, "faces smaller than this (pixels) are not faces")
    inversion_steps: int = opt(20, "DDIM inversion steps per image (paper: 50); the reference latent at any "
                                   "training sigma is interpolated from this trajectory")
    inversion_scheduler: str = opt("simple", "ComfyUI scheduler of the inversion sigmas (as in the encode node)")
    shard_size: int = opt(256, "images per shard file")
    batch_size: int = opt(8, "images per VAE/inversion batch while preprocessing")
    storage_dtype: str = opt("float16", "dtype of stored latents and captions: float16 (half the disk) or float32")
    identity_folders: bool = opt(False, "a folder source: each image's first subfolder names its person "
                                        "(faces/<person>/*.jpg), as a manifest's \"identity\" does")
    reference: str = opt("auto", "a target's reference in training: 'other' (another photo of the same person: "
                                 "needs identities in the manifest), 'self' (the target itself, the paper's "
                                 "setting), 'auto' (other when the shards name identities, else self)")


@dataclass
class TrainConfig:
    output_dir: str = opt("", "run folder: checkpoints/, samples/, log.jsonl and the final invadapter.safetensors",
                          path=True)
    max_steps: int = opt(10000, "optimizer steps")
    batch_size: int = opt(4, "images per process per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimizer step (global batch = batch x accum x processes)")
    seed: int = opt(0, "seed of data order, timesteps, noise and caption dropout")
    caption_dropout: float = opt(0.1, "probability of training a sample on the empty prompt (for CFG)")
    min_timestep: int = opt(0, "timesteps are drawn uniformly from [min_timestep, max_timestep]")
    max_timestep: int = opt(999, "timesteps are drawn uniformly from [min_timestep, max_timestep]")
    references: int = opt(0, "K: reference photos of the target's identity per target, combined as inference "
                             "combines several photos (IDAdapter's mixed facial features, MFF); K > 1 needs several "
                             "photos per person (identities in the manifest; a Python data source: "
                             "TrainingSample.more_references). 0: auto, K = 2 when the shards name people and at "
                             "least 90 % of the targets keep enough photos of their person, else 1 (1 for a Python "
                             "data source; a resumed run keeps its K); the run's config.json records the K chosen")
    reference_combine: str = opt("concat", "how the K references combine, as InvAdapterApply's combine: 'concat' "
                                           "(their tokens side by side) or 'average'")
    mixed_precision: str = opt("auto", "'auto' (bf16 on CUDA with bf16 support, else fp16; none on CPU), 'bf16', "
                                       "'fp16' or 'no'")
    log_every: int = opt(10, "steps between log lines (log.jsonl and stdout)")
    checkpoint_every: int = opt(500, "steps between checkpoints (0: only at the end)")
    keep_checkpoints: int = opt(3, "newest checkpoints kept (older ones are deleted)")
    resume: str = opt("auto", "'auto' (latest checkpoint in output_dir, if any), 'no', or a checkpoint folder",
                      path=True)
    export_dtype: str = opt("float16", "dtype of the final weights file: float16, bfloat16 or float32")
    tensorboard: bool = opt(True, "also log to output_dir/tensorboard when the tensorboard package is installed")


@dataclass
class OptimConfig:
    lr: float = opt(1e-4, "AdamW learning rate (paper: 1e-4)")
    weight_decay: float = opt(1e-2, "AdamW weight decay (paper: 1e-2)")
    betas: list = opt([0.9, 0.999], "AdamW betas")
    eps: float = opt(1e-8, "AdamW epsilon")
    warmup_steps: int = opt(0, "linear learning-rate warm-up steps, then constant")
    grad_clip: float = opt(1.0, "max global gradient norm (0: no clipping)")


@dataclass
class ValidationConfig:
    every: int = opt(500, "steps between validations (0: none): the held-out loss and images; also at the end, "
                          "and at step 0 (the held-out loss with and without the adapter, and the baseline images)")
    holdout: int = opt(-1, "images held out of training for the held-out loss (the last ones of the cache; -1: "
                           "a tenth of them, at most 32; 0: none)")
    images: int = opt(2, "references to sample with (the first held-out images, else the first cached ones)")
    prompts: list = opt([], "prompts to generate (empty: each reference's own caption)")
    steps: int = opt(20, "sampling steps")
    cfg: float = opt(5.0, "classifier-free guidance scale")
    sampler: str = opt("euler", "ComfyUI sampler name")
    scheduler: str = opt("normal", "ComfyUI scheduler name")
    size: int = opt(0, "generated image size in pixels (0: the reference resolution)")
    seed: int = opt(0, "sampling seed, and of the held-out loss's timesteps and noise (fixed, so validations are "
                       "comparable across steps)")
    baseline: bool = opt(True, "also save the same images without the adapter (once, at the first validation)")


@dataclass
class LossConfig:
    """One weight per loss term of ``step.LOSS_TERMS``, under the term's name (0: the term is not computed), and the
    terms' settings."""
    denoising: float = opt(1.0, "weight of the denoising loss (eq. 6: epsilon-prediction MSE)")
    identity: float = opt(1.0, "weight of the identity loss: 1 - cosine between a face recognizer's embedding of "
                               "the denoised prediction (decoded by the VAE) and the reference's, weighted by "
                               "alpha_bar(t). On when a recognizer is set (loss.recognizer; a Python caller passes "
                               "one to the trainer), off without one; 0 turns it off")
    # not loss terms (step.LOSS_TERMS): the identity term's recognizer
    recognizer: str = opt("", "turns the identity loss on: the ArcFace recognition model, an InsightFace .onnx file "
                              "(e.g. <insightface>/models/antelopev2/glintr100.onnx or "
                              "models/buffalo_l/w600k_r50.onnx)",
                          path=True)
    recognizer_resolution: int = opt(0, "pixels the identity loss decodes the latent at (its side; 0: the training "
                                        "resolution); lower saves VAE memory, e.g. 256 at 512 px")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    pass


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def _section(cfg: Config, name: str):
    if name not in SECTIONS:
        raise ConfigError(f"unknown config section [{name}]; sections: {', '.join(SECTIONS)}")
    return getattr(cfg, name)


def _coerce(section, key: str, value: Any, base_dir: Optional[str], where: str):
    fields = {f.name: f for f in dataclasses.fields(section)}
    if key not in fields:
        raise ConfigError(f"{where}: unknown key '{key}' in [{type(section).__name__}]; keys: {', '.join(fields)}")
    current = getattr(section, key)
    f = fields[key]
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
    elif isinstance(current, int) and not isinstance(value, bool) and isinstance(value, (int, float)):
        if int(value) != value:
            raise ConfigError(f"{where}: {key} must be an integer, got {value!r}")
        value = int(value)
    elif isinstance(current, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = float(value)
    elif isinstance(current, list) and isinstance(value, list):
        pass
    elif isinstance(current, str) and isinstance(value, str):
        if f.metadata.get("path") and value and base_dir is not None and value not in ("auto", "no", "base",
                                                                                       "random"):
            value = os.path.normpath(os.path.join(base_dir, os.path.expanduser(value)))
    else:
        raise ConfigError(f"{where}: {key} must be a {type(current).__name__}, got {value!r}")
    setattr(section, key, value)


def load_config(path: Optional[str], overrides: list[str] = ()) -> Config:
    cfg = Config()
    if path:
        raw = _read(path)
        base = os.path.dirname(os.path.abspath(path))
        for name, values in raw.items():
            section = _section(cfg, name)
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: [{name}] must be a table of keys")
            for key, value in values.items():
                _coerce(section, key, value, base, path)
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. train.max_steps=100")
        dotted, text = item.split("=", 1)
        name, key = dotted.split(".", 1)
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text  # a bare string
        _coerce(_section(cfg, name), key, value, os.getcwd(), f"--set {dotted}")
    return cfg


def _read(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    try:
        if path.endswith(".toml"):
            import tomllib

            return tomllib.loads(data.decode("utf-8"))
        return json.loads(data)
    except Exception as e:  # noqa: BLE001 - any parse error is the user's file: say which and why
        raise ConfigError(f"cannot parse {path} ({'TOML' if path.endswith('.toml') else 'JSON'}): {e}") from None


def require(value: str, name: str) -> str:
    if not value:
        raise ConfigError(f"{name} is not set: put it in the config file or pass --set {name}=...")
    return value


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(v)  # a TOML basic string is a JSON string


def dump_toml(cfg: Config) -> str:
    """The config as TOML, every key with its help text as a comment."""
    lines = []
    for name in SECTIONS:
        section = getattr(cfg, name)
        lines.append(f"[{name}]")
        for f in dataclasses.fields(section):
            lines.append(f"# {f.metadata.get('help', '')}")
            lines.append(f"{f.name} = {_toml_value(getattr(section, f.name))}")
        lines.append("")
    return "\n".join(lines)
