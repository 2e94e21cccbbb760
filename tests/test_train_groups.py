"""Issue 21, real data: a manifest naming each photo's person feeds "reference = another photo of the same person"
and K references per target (MFF) from the shards (`invadapter_core.train.groups`).

Generated photos of four people (3, 3, 4 and 1 photos) and one photo naming nobody, preprocessed as two torchrun
processes would (each its every other line) with the tiny SD1.5-shaped UNet; the command line runs on the shallow
SD1.5 checkpoint.
"""
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from invadapter_core.train.__main__ import main as cli
from invadapter_core.train.config import load_config
from invadapter_core.train.data import DataError, ShardSet
from invadapter_core.train.distributed import DistInfo
from invadapter_core.train.groups import auto_references, identity_split
from invadapter_core.train.loop import train
from invadapter_core.train.preprocess import preprocess
from support import models

pytestmark = pytest.mark.usefixtures("one_thread")

RES = 64
PEOPLE = {"ana": 3, "ben": 3, "cy": 4, "solo": 1}


def grouped_manifest(folder: Path, with_identities: bool = True) -> dict[str, str]:
    """Photos of PEOPLE (each person a colour, each photo its own noise), one photo naming no one and a line with a
    bad identity; returns image file name -> person."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines, people = [], {}
    for p, (name, count) in enumerate(PEOPLE.items()):
        colour = np.array([60 + 60 * p, 200 - 40 * p, 90 + 30 * p])
        for k in range(count):
            image = np.clip(colour + rng.normal(0, 40, (RES, RES, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(image).save(folder / f"{name}-{k}.png")
            line = {"image": f"{name}-{k}.png", "caption": f"a photo of {name}, number {k}"}
            if with_identities:
                line["identity"] = name
            lines.append(json.dumps(line))
            people[f"{name}-{k}.png"] = name
    Image.fromarray(rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8)).save(folder / "nobody.png")
    lines.append(json.dumps({"image": "nobody.png", "caption": "a photo of someone"}))
    if with_identities:
        lines.append(json.dumps({"image": "ana-0.png", "caption": "a photo", "identity": ["ana"]}))
    (folder / "faces.jsonl").write_text("\n".join(lines) + "\n")
    return people


def overrides(source: Path, cache: Path, out: Path, **extra) -> list[str]:
    values = {"data.source": str(source), "data.cache_dir": str(cache), "train.output_dir": str(out),
              "data.resolution": RES, "data.inversion_steps": 4, "data.shard_size": 2, "data.face_crop": "center",
              "model.tokens_m": 16, "train.batch_size": 2, "train.max_steps": 4, "train.log_every": 1,
              "train.checkpoint_every": 0, "train.caption_dropout": 0.0, "validation.every": 0,
              "validation.holdout": 0, "train.export_dtype": "float32"}
    values.update(extra)
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in values.items()]


@pytest.fixture(scope="module")
def grouped(tmp_path_factory, clip_vae, tiny_model):
    """(manifest, cache, image -> person, the two processes' summaries): preprocessed as 2 torchrun processes."""
    base = tmp_path_factory.mktemp("grouped")
    people = grouped_manifest(base / "faces")
    cfg = load_config(None, overrides(base / "faces" / "faces.jsonl", base / "cache", base / "unused"))
    summaries = [preprocess(cfg, tiny_model, *clip_vae, DistInfo(rank, 2), progress=False) for rank in (0, 1)]
    return base / "faces" / "faces.jsonl", base / "cache", people, summaries


def config(grouped, out: Path, **extra):
    return load_config(None, overrides(grouped[0], grouped[1], out, **extra))


def person_of(shards: ShardSet, i: int) -> str:
    return shards.identities[i]


def test_identities_are_kept_in_the_sharded_preprocess(grouped):
    _, cache, people, summaries = grouped
    assert sum(s["kept"] for s in summaries) == 12
    assert sum(s["skip_reasons"].get("bad manifest line", 0) for s in summaries) == 1  # "identity": ["ana"]
    assert sorted(p.name[:13] for p in cache.glob("shard-*")) == ["shard-r000of0"] * 3 + ["shard-r001of0"] * 3
    shards = ShardSet(str(cache))
    assert shards.grouped and len(shards) == 12
    images = []
    for f in shards.files:
        with safe_open(f, framework="pt") as handle:
            images += json.loads(handle.metadata()["images"])
    assert [shards.identities[i] for i in range(12)] == [people.get(Path(img).name) for img in images]
    assert shards.identities.count(None) == 1  # the photo naming no one


def test_the_reference_is_another_photo_of_the_same_person(grouped, tmp_path, caplog):
    shards = ShardSet(str(grouped[1]))
    with caplog.at_level(logging.INFO, logger="InvAdapter.train"):
        source, held = identity_split(shards, config(grouped, tmp_path, **{"train.references": 2}), 0, 2)
    assert held is None
    # K = 2 with another photo: a person needs 3 photos; solo's and the nameless one are skipped, and said so
    assert len(source) == 10 and source.skipped == 2
    assert "2 target(s) skipped, their person having fewer than 3 photos" in caplog.text
    assert "reference = another photo of the same person + 1 more photo(s)" in caplog.text
    again = identity_split(ShardSet(str(grouped[1])), config(grouped, tmp_path, **{"train.references": 2}), 0, 2,
                           False)[0]
    first_refs = {}
    for i in range(len(source)):
        target = source.targets[i]
        for draw_id in range(6):
            photos = source.photos(i, draw_id, seed=3)
            assert len(set(photos)) == 2 and target not in photos
            assert {person_of(shards, j) for j in photos} == {person_of(shards, target)}
            sample = source.sample_for_draw(i, draw_id, 3)
            assert torch.equal(sample.target, shards[target].target)
            assert torch.equal(sample.reference_states, shards.view(photos[0]).states)
            assert torch.equal(sample.reference_context, shards.view(photos[0]).context)
            assert not torch.equal(sample.reference_states[0], sample.target)
            assert len(sample.more_references) == 1
            assert torch.equal(sample.more_references[0].states, shards.view(photos[1]).states)
            # deterministic: the same draw from freshly read shards gives the same photos
            assert again.photos(i, draw_id, 3) == photos
            first_refs.setdefault(i, set()).add(photos[0])
    assert all(len(refs) > 1 for refs in first_refs.values())  # the reference changes from draw to draw


def test_the_sample_order_draws_the_photos_per_draw_whatever_the_process_count(grouped, tmp_path):
    """The trainer's order hands each draw id to the source: the photos, like the noise, depend on the draw only."""
    from invadapter_core.train.data import SampleOrder

    shards = ShardSet(str(grouped[1]))
    source, _ = identity_split(shards, config(grouped, tmp_path, **{"train.references": 2}), 0, 2, False)
    one = SampleOrder(len(source), 2, 0, 1, seed=5)
    two = [SampleOrder(len(source), 1, rank, 2, seed=5) for rank in (0, 1)]
    for micro_step in range(2 * one.batches_per_epoch):  # two epochs: the second draws other photos
        drawn = one.samples(source, micro_step)
        for (sample, draw_id), (index, same_id) in zip(drawn, one.draw(micro_step)):
            assert draw_id == same_id
            photos = source.photos(index, draw_id, 5)
            assert torch.equal(sample.reference_states, shards.view(photos[0]).states)
            assert torch.equal(sample.more_references[0].states, shards.view(photos[1]).states)
        split = [two[rank].samples(source, micro_step)[0] for rank in (0, 1)]
        assert [d for _, d in split] == [d for _, d in drawn]
        assert all(torch.equal(a.reference_states, b.reference_states) for (a, _), (b, _) in zip(split, drawn))


def test_self_reference_and_more_photos_and_the_skip_rule(grouped, tmp_path):
    shards = ShardSet(str(grouped[1]))
    source, _ = identity_split(shards, config(grouped, tmp_path, **{"data.reference": "self",
                                                                    "train.references": 3}), 0, 2, False)
    assert len(source) == 10  # self + 2 more: 3 photos per person
    for i in range(len(source)):
        sample = source.sample_for_draw(i, 7, 0)
        assert torch.equal(sample.reference_states[0], sample.target)  # the target is its own first reference
        photos = source.photos(i, 7, 0)
        assert photos[0] == source.targets[i] and len(set(photos)) == 3
        assert {person_of(shards, j) for j in photos} == {person_of(shards, photos[0])}
        assert [torch.equal(v.states, shards.view(j).states) for v, j in zip(sample.more_references, photos[1:])] \
            == [True, True]
    # K = 3 with another photo: 4 photos per person, only cy's
    source, _ = identity_split(shards, config(grouped, tmp_path, **{"train.references": 3}), 0, 2, False)
    assert {person_of(shards, t) for t in source.targets} == {"cy"} and source.skipped == 8
    with pytest.raises(DataError, match="fewer than one global batch of 8: lower train.references"):
        identity_split(shards, config(grouped, tmp_path, **{"train.references": 3}), 0, 8, False)
    # without groups in the settings ("self", K = 1) every image is its own reference, as on plain shards
    source, _ = identity_split(shards, config(grouped, tmp_path, **{"data.reference": "self"}), 0, 2, False)
    assert len(source) == 12 and torch.equal(source[5].reference_states, shards[source.targets[5]].reference_states)


def test_whole_people_are_held_out(grouped, tmp_path):
    shards = ShardSet(str(grouped[1]))
    cfg = config(grouped, tmp_path, **{"train.references": 2, "validation.seed": 4})
    source, held = identity_split(shards, cfg, 3, 2, False)
    # the last person by name with enough photos (cy, 4), whole: solo has too few to be a target
    assert {h.caption.split(",")[0] for h in held} == {"a photo of cy"} and len(held) == 4
    assert "cy" not in {person_of(shards, t) for t in source.targets} and len(source) == 6
    cy = [i for i in range(len(shards)) if person_of(shards, i) == "cy"]
    for sample in held:
        refs = [sample.reference_states] + [v.states for v in sample.more_references]
        assert all(any(torch.equal(r, shards.view(j).states) for j in cy) for r in refs)
    again = identity_split(shards, cfg, 3, 2, False)[1]  # fixed draws: the same samples every validation
    assert all(torch.equal(a.reference_states, b.reference_states) for a, b in zip(held, again))


def test_grouped_training_resumes_exactly(grouped, tmp_path, tiny_model):
    extra = {"train.references": 2, "validation.holdout": 3, "validation.every": 4}
    straight = train(config(grouped, tmp_path / "a", **extra), tiny_model, progress=False)
    first = train(config(grouped, tmp_path / "b", **extra, **{"train.max_steps": 2}), tiny_model, progress=False)
    resumed = train(config(grouped, tmp_path / "b", **extra), tiny_model, progress=False)
    assert straight.step == 4 and all(np.isfinite(straight.losses))
    assert first.losses == straight.losses[:2] and resumed.losses == straight.losses[2:]
    # held-out loss on cy's 4 photos, at steps 0 and 4, each with another photo of cy as its reference
    assert [h["step"] for h in straight.heldout] == [0, 4] and np.isfinite(straight.heldout[1]["heldout_loss"])


def test_a_folder_of_people_names_them_when_asked(tmp_path):
    """data.identity_folders: faces/<person>/*.png; an image directly in the folder names no one."""
    from invadapter_core.train.data import list_items

    for name in ("ana/0.png", "ana/1.png", "ben/deep/2.png", "top.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / name)
    named = {Path(i.image).relative_to(tmp_path).as_posix(): i.identity for i in list_items(str(tmp_path), True)}
    assert named == {"ana/0.png": "ana", "ana/1.png": "ana", "ben/deep/2.png": "ben", "top.png": None}
    assert {i.identity for i in list_items(str(tmp_path))} == {None}  # off by default: subfolders are only folders
    from invadapter_core.train.config_check import check_config

    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "top.png", "caption": "x", "identity": "ana"}) + "\n")
    cfg = load_config(None, [f"data.source={tmp_path / 'm.jsonl'}", "data.identity_folders=true"])
    assert [line for line in check_config(cfg, "preprocess") if line.startswith("data.identity_folders")] == [
        "data.identity_folders = True: is for a folder source; a manifest names the person with \"identity\" on "
        "each line"]


@pytest.fixture(scope="module")
def ungrouped(tmp_path_factory, clip_vae, tiny_model):
    base = tmp_path_factory.mktemp("ungrouped")
    grouped_manifest(base / "faces", with_identities=False)
    lines = (base / "faces" / "faces.jsonl").read_text().splitlines()[:3]
    (base / "faces" / "faces.jsonl").write_text("\n".join(lines) + "\n")
    cfg = load_config(None, overrides(base / "faces" / "faces.jsonl", base / "cache", base / "unused"))
    preprocess(cfg, tiny_model, *clip_vae, DistInfo(), progress=False)
    return base


@pytest.mark.parametrize("setting, says", [
    ({"train.references": 2}, "train.references = 2 needs several photos per person, and the shards in"),
    ({"data.reference": "other"}, "data.reference = \"other\" needs several photos per person"),
])
def test_settings_needing_people_are_refused_on_shards_without(ungrouped, tmp_path, tiny_model, capsys, setting,
                                                               says):
    cfg = load_config(None, overrides(ungrouped / "faces" / "faces.jsonl", ungrouped / "cache", tmp_path, **setting))
    with pytest.raises(DataError, match=says):
        train(cfg, tiny_model, progress=False)
    # the command refuses before the model loads: one line naming the key and the fix
    code = cli(["train", "--quiet", "--set", f"model.checkpoint={models.shallow_sd15_checkpoint()}",
                *sum((["--set", o] for o in overrides(ungrouped / "faces" / "faces.jsonl", ungrouped / "cache",
                                                        tmp_path, **setting)), [])])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {says}"), err
    assert "give the manifest's lines an \"identity\"" in err[0]
    # the plain setting still trains on them
    plain = train(load_config(None, overrides(ungrouped / "faces" / "faces.jsonl", ungrouped / "cache",
                                              tmp_path / "plain", **{"train.max_steps": 1})), tiny_model,
                  progress=False)
    assert plain.step == 1


def test_references_default_to_two_photos_when_the_people_have_them(grouped, ungrouped, tmp_path, tiny_model,
                                                                     capsys):
    """train.references = 0 (the default, auto): K = 2 when the shards name people and at least 90 % of the targets
    keep enough photos, else 1; the run says what it chose and records it in config.json."""
    shards = ShardSet(str(grouped[1]))
    # "other": ana 3, ben 3, cy 4 photos can all give a target two others; solo and nobody are no target either way
    assert auto_references(shards, config(grouped, tmp_path)) == (
        2, "10 of 10 targets keep enough photos of their person with K = 2 (at least 90%)")
    # "self": every image is a target with K = 1, but only 10 of the 12 have a second photo of their person
    k, why = auto_references(shards, config(grouped, tmp_path, **{"data.reference": "self"}))
    assert (k, why) == (1, "10 of 12 targets keep enough photos of their person with K = 2 (below 90%); set "
                           "train.references = 2 to train those 10 alone")
    assert auto_references(ShardSet(str(ungrouped / "cache")), config(grouped, tmp_path)) == (
        1, "the shards name no people")

    cfg = config(grouped, tmp_path / "run", **{"train.max_steps": 1})
    assert cfg.train.references == 0
    capsys.readouterr()
    assert train(cfg, tiny_model, progress=False).step == 1
    assert "train.references = auto: 2 (10 of 10 targets" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["references"] == 2
    assert cfg.train.references == 0  # the caller's config is not changed


def test_a_resumed_run_keeps_the_k_it_trained_with(grouped, tmp_path, tiny_model, capsys):
    """auto never changes K in the middle of a run: resuming a K = 1 run (say, one trained before auto existed)
    keeps K = 1 on data where a fresh run would take 2."""
    out = tmp_path / "run"
    train(config(grouped, out, **{"train.references": 1, "train.max_steps": 1}), tiny_model, progress=False)
    capsys.readouterr()
    assert train(config(grouped, out, **{"train.max_steps": 2}), tiny_model, progress=False).step == 2
    assert "train.references = auto: 1 (as in the run it resumes)" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["train"]["references"] == 1


def test_cli_trains_k_2_on_the_grouped_manifest(tmp_path):
    """preprocess + train through the command line on the shallow SD1.5 checkpoint, K = 2 photos per target."""
    people = grouped_manifest(tmp_path / "faces")
    lines = [line for line in (tmp_path / "faces" / "faces.jsonl").read_text().splitlines()
             if json.loads(line).get("identity") in ("ana", "ben")]
    (tmp_path / "faces" / "faces.jsonl").write_text("\n".join(lines) + "\n")
    assert len(lines) == 6 and set(people.values()) >= {"ana", "ben"}
    args = ["--quiet", "--set", f"model.checkpoint={models.shallow_sd15_checkpoint()}"] + sum(
        (["--set", o] for o in overrides(tmp_path / "faces" / "faces.jsonl", tmp_path / "cache", tmp_path / "run",
                                         **{"data.inversion_steps": 2, "data.shard_size": 4, "train.batch_size": 1,
                                            "train.max_steps": 2, "train.references": 2})), [])
    assert cli(["preprocess", *args]) == 0
    assert cli(["train", *args]) == 0
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2] and all(np.isfinite(e["loss"]) for e in log)
    assert (tmp_path / "run" / "invadapter.safetensors").is_file()
