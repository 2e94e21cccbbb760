"""``python -m invadapter_core.evaluate``: end to end on the random shallow test checkpoint (interrupted with Ctrl-C,
then resumed), with random-weight CLIP-L / ViT-L files for CLIP-T and CLIP-I; the data formats, the results file,
the copy-paste indicator on real photos and the CLIP metrics' skip messages."""
from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from invadapter_core.evaluate import dataset, results
from invadapter_core.evaluate.pipeline import Config
from invadapter_core.evaluate.run import option_name
from support import faces, models
from support.host import ctrl_c_reaches_the_child, python_exe

ROOT = Path(__file__).resolve().parents[1]


def _command(*args) -> list[str]:
    return [python_exe(), "-m", "invadapter_core.evaluate", *map(str, args)]


def test_help_documents_the_metrics_without_importing_comfyui():
    out = subprocess.run(_command("--help"), cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for word in ("FACE-SIM", "CLIP-T", "CLIP-I", "copy_paste", "resumes", "--clip-vision", "--weight-self",
                 "--block-weights", "manifest"):
        assert word in out.stdout
    assert "Total VRAM" not in out.stdout + out.stderr  # ComfyUI was not imported


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(path)
    return path


def test_dataset_folder_and_manifest(tmp_path):
    data = tmp_path / "data"
    _png(data / "ada" / "b.png"), _png(data / "ada" / "a.png"), _png(data / "bob" / "1.jpg")
    _write(data / "prompts.txt", "a photo of a person\n\n  in the snow  \n")
    _write(data / "bob" / "prompts.txt", "only this\n")
    _write(data / "bob" / "caption.txt", "a photo of a man's face\n")
    _write(data / "notes.txt", "ignored")
    ada, bob = dataset.load_identities(str(data))
    assert ada.name == "ada" and ada.reference.endswith("a.png") and ada.other_photos[0].endswith("b.png")
    assert ada.prompts == ["a photo of a person", "in the snow"] and ada.caption == "a photo of a face"
    assert bob.prompts == ["only this"] and bob.caption == "a photo of a man's face"
    assert [i.prompts for i in dataset.load_identities(str(data), ["x"])] == [["x"], ["x"]]

    manifest = _write(tmp_path / "m.jsonl", json.dumps({"identity": "ada", "photos": ["data/ada/a.png"],
                                                        "prompts": ["p1", "p2"]}) + "\n\n")
    (ada,) = dataset.load_identities(str(manifest), caption="c")
    assert ada.photos == [str(tmp_path / "data" / "ada" / "a.png")] and ada.prompts == ["p1", "p2"]
    assert ada.caption == "c"
    with pytest.raises(dataset.DatasetError, match="photo.s. not found: .*missing.png"):
        dataset.load_identities(str(_write(tmp_path / "bad.jsonl", '{"photos": ["missing.png"]}\n')))
    with pytest.raises(dataset.DatasetError, match="line 1 is not JSON"):
        dataset.load_identities(str(_write(tmp_path / "bad2.jsonl", "{oops\n")))
    (data / "prompts.txt").unlink()
    with pytest.raises(dataset.DatasetError, match="identity 'ada' has no prompts: put them in"):
        dataset.load_identities(str(data))
    with pytest.raises(dataset.DatasetError, match="neither a folder"):
        dataset.load_identities(str(tmp_path / "nothing"))


def test_results_file_drops_a_torn_row_and_refuses_other_settings(tmp_path):
    config = Config("init from model", 1.0, 0.5, "none")
    row = {k: "" for k in results.FIELDS} | {"identity": "ada", "prompt": "p", "seed": 3, "config": config.name,
                                              "face_sim": 0.5, "face_found": True, "clip_t": math.nan}
    f = results.ResultsFile(tmp_path)
    f.append(row)
    with open(f.path, "a") as handle:
        handle.write("ada,0,p,4,torn")  # what a kill in the middle of a write leaves
    again = results.ResultsFile(tmp_path)
    assert again.done(results.row_key("ada", "p", 3, config.name))
    assert not again.done(results.row_key("ada", "p", 4, config.name))
    assert f.path.read_text().endswith("\n") and len(again.rows) == 1
    summary = results.summarize(again.rows, [config])[0]
    assert summary["images"] == 1 and summary["face_sim"] == 0.5 and summary["clip_t"] is None

    results.check_run(tmp_path, {"steps": 20}, restart=False)
    results.check_run(tmp_path, {"steps": 20}, restart=False)
    with pytest.raises(results.ResumeMismatch, match=r"steps 20 -> 4.*--restart"):
        results.check_run(tmp_path, {"steps": 4}, restart=False)
    results.check_run(tmp_path, {"steps": 4}, restart=True)
    assert not f.path.exists()

    # a changed setting is named by the option that sets it, old -> new, not by dumping the settings
    nested = tmp_path / "nested"
    nested.mkdir()
    results.check_run(nested, {"settings": {"steps": 20, "cfg": 7.0}, "clip": None}, restart=False)
    with pytest.raises(results.ResumeMismatch) as refused:
        results.check_run(nested, {"settings": {"steps": 4, "cfg": 7.0}, "clip": "c.safetensors"}, restart=False,
                          name=option_name)
    assert "(--clip None -> 'c.safetensors'; --steps 20 -> 4)" in str(refused.value)
    assert "cfg" not in str(refused.value)


def test_merge_results_folds_partials_in_grid_order_each_image_once(tmp_path):
    """results.csv + partial files of any ranks -> results.csv in the grid's order, each image once (results.csv's
    row first, else the lowest rank's), a torn last row ignored, rows outside the grid kept after it; the partials
    deleted; a results.csv already in order and complete is not rewritten; --restart deletes partials too."""
    def row(seed, seconds, config="c"):
        return {k: "" for k in results.FIELDS} | {"identity": "ada", "prompt": "p", "seed": seed, "config": config,
                                                  "seconds": seconds}

    order = {results.row_key("ada", "p", seed, "c"): i for i, seed in enumerate(range(5))}
    results.ResultsFile(tmp_path).append(row(3, 1.0))
    results.ResultsFile(tmp_path).append(row(9, 1.0, config="old"))  # a setting no longer in the grid
    for rank, seeds in ((0, [0, 3]), (1, [4, 1]), (7, [1, 2])):  # rank 7: from a run with more processes
        partial = results.ResultsFile(tmp_path, results.partial_name(rank))
        for seed in seeds:
            partial.append(row(seed, 10.0 + rank))
    with open(tmp_path / "results-r1.csv", "a") as f:
        f.write("ada,0,p,2,c,tor")  # a process killed mid-row: that image is redone, not merged
    (tmp_path / "results-rx.csv").write_text("not a partial file\n")
    results.merge_results(tmp_path, order)
    merged = results.ResultsFile(tmp_path).rows
    assert [(r["seed"], r["config"], r["seconds"]) for r in merged] == [
        ("0", "c", "10"), ("1", "c", "11"), ("2", "c", "17"), ("3", "c", "1"), ("4", "c", "11"), ("9", "old", "1")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results-rx.csv", "results.csv"]
    inode = os.stat(tmp_path / "results.csv").st_ino
    results.merge_results(tmp_path, order)
    assert os.stat(tmp_path / "results.csv").st_ino == inode  # nothing to do: not rewritten

    results.ResultsFile(tmp_path, results.partial_name(0)).append(row(5, 1.0))
    results.check_run(tmp_path, {"steps": 20}, restart=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results-rx.csv", "run.json"]


def test_face_metric_copy_paste_indicator(photos):
    pytest.importorskip("dlib")
    from invadapter_core.evaluate.metrics import FaceMetric

    metric = FaceMetric("dlib", "antelopev2", [], "cpu", 32)
    obama = metric.identity(photos["obama"], [photos["obama2"], photos["obama3"]])
    assert 0.5 < obama.real_photo_sim < 0.8
    copy = metric.score(photos["obama"], obama)  # the reference itself: a perfect copy
    assert copy["face_sim"] == pytest.approx(1.0) and copy["copy_paste"] == pytest.approx(1.0 - obama.real_photo_sim)
    new_photo = metric.score(photos["obama3"], obama)  # a real other photo scores about like the person's photos
    assert abs(new_photo["copy_paste"]) < 0.15 and new_photo["face_sim_other_photos"] > 0.5
    other = metric.score(photos["biden"], obama)
    assert other["face_sim"] < 0.5 and other["copy_paste"] < -0.3
    print(f"\ncopy_paste: the reference itself {copy['copy_paste']:+.3f}, another photo of the person "
          f"{new_photo['copy_paste']:+.3f}, another person {other['copy_paste']:+.3f} "
          f"(real_photo_sim {obama.real_photo_sim:.3f})")
    single = metric.identity(photos["biden"], [])
    assert math.isnan(single.real_photo_sim) and math.isnan(metric.score(photos["biden"], single)["copy_paste"])


def test_clip_metrics_are_skipped_with_a_message():
    from invadapter_core.evaluate.metrics import ClipMetric
    from invadapter_core.evaluate.pipeline import Nodes, PipelineError

    nodes = Nodes()
    none = ClipMetric(nodes, None, None)
    assert set(none.skipped) == {"clip_i", "clip_t"} and "--clip-vision FILE" in none.skipped["clip_i"]
    vision = models.clip_vision_file()
    # an SD1.5 checkpoint's text encoder has no text projection: not CLIP's joint space
    no_projection = ClipMetric(nodes, str(models.shallow_sd15_checkpoint()), str(vision))
    assert list(no_projection.skipped) == ["clip_t"] and "no text projection" in no_projection.skipped["clip_t"]
    assert not ClipMetric(nodes, str(models.clip_l_file()), str(vision)).skipped
    with pytest.raises(PipelineError, match="neither a file nor a file in ComfyUI's 'clip_vision' folders"):
        ClipMetric(nodes, None, "no-such-vision.safetensors")


GRID = ["--prompt", "a photo of a man in the snow", "--weight-self", 0, 1, "--images-per-prompt", 2, "--steps", 2,
        "--width", 64, "--height", 64, "--resolution", 64, "--cfg", 1, "--seed", 5]


def _grid(data: Path, out: Path) -> list:
    """The end-to-end grid's arguments: obama x 1 prompt x seeds 5, 6 x weight_self 0, 1 (+ what DATA holds)."""
    return [data, "--checkpoint", models.shallow_sd15_checkpoint(), "--out", out, *GRID,
            "--clip", models.clip_l_file(), "--clip-vision", models.clip_vision_file()]


def _obama(data: Path) -> Path:
    paths = faces.labelled_photos()
    (data / "obama").mkdir(parents=True)
    (data / "obama" / "1.jpg").symlink_to(paths["obama"])
    (data / "obama" / "2.jpg").symlink_to(paths["obama2"])
    return data


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory, photos):
    """One process, Ctrl-C once the first image is written, then the same command again: (first run's return code
    and stderr, the second run, --out). Its results.csv is also the reference the torchrun test compares with."""
    pytest.importorskip("dlib")
    tmp_path = tmp_path_factory.mktemp("single")
    data = _obama(tmp_path / "data")
    (data / "nobody").mkdir()
    Image.fromarray((np.random.default_rng(0).random((96, 96, 3)) * 255).astype(np.uint8)).save(
        data / "nobody" / "1.png")
    out = tmp_path / "out"
    command = _command(*_grid(data, out))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

    # first run: Ctrl-C once the first image is written
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=ctrl_c_reaches_the_child)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith("[5/8]"):  # nobody's 4 images are counted as skipped first
            proc.send_signal(signal.SIGINT)
            break
    rest_out, rest_err = proc.communicate(timeout=300)
    with open(out / "results.csv", newline="") as f:
        rows_after_interruption = len(list(csv.DictReader(f)))
    # second run: resumes, generates only the missing images, prints the summary as one JSON line
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return proc.returncode, "".join(seen) + rest_err, rows_after_interruption, done, out


def test_end_to_end_interrupted_then_resumed(single_process_run):
    returncode, err, rows_after_interruption, done, out = single_process_run
    assert returncode == 130, err[-4000:]
    assert "interrupted" in err and "run the same command again to resume" in err
    assert "[4/8] skipping identity nobody (4 image(s)): reference photo" in err and "no face found" in err
    # the advice names the command line's options, not the face crop node's widgets
    assert "--on-no-face 'center crop'" in err and "--crop-min-face-size" in err
    assert "on_no_face" not in err and "min_face_size" not in err
    assert rows_after_interruption == 1

    # (exit status 1: the run is done, but an identity could not be evaluated)
    assert done.returncode == 1, done.stderr[-4000:]
    assert "error: 1 identity(ies) could not be evaluated (4 image(s)): nobody: reference photo" in done.stderr
    assert "resuming: 1 of 8 images already in" in done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["resumed"] == 1 and summary["generated"] == 3 and summary["images"] == 4
    assert summary["processes"] == 1
    assert summary["recognizer"] == "dlib" and summary["skipped_metrics"] == {}
    assert list(summary["skipped_identities"]) == ["nobody"] and summary["not_evaluated"] == 4
    assert [c["config"] for c in summary["configs"]] == ["init from model|ws=0|wc=1|bw=none",
                                                         "init from model|ws=1|wc=1|bw=none"]
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["weight_self"], r["seed"]) for r in rows] == [("0", "5"), ("0", "6"), ("1", "5"), ("1", "6")]
    for config in summary["configs"]:
        mine = [r for r in rows if r["config"] == config["config"]]
        assert config["images"] == 2 and config["no_face"] == sum(r["face_found"] != "True" for r in mine)
        assert config["clip_t"] == pytest.approx(np.mean([float(r["clip_t"]) for r in mine]), abs=1e-3)
    for row in rows:
        assert (out / row["image"]).is_file()
        assert Image.open(out / row["image"]).size == (64, 64)
        assert 0.5 < float(row["real_photo_sim"]) < 0.8  # obama.jpg against obama2.jpg
        assert -1 <= float(row["clip_t"]) <= 1 and -1 <= float(row["clip_i"]) <= 1
        # random-weight generations: the face columns are empty exactly where no face was found
        assert (row["face_found"] == "True") == (row["face_sim"] != "")
        if row["face_sim"]:
            assert float(row["copy_paste"]) == pytest.approx(float(row["face_sim"]) - float(row["real_photo_sim"]),
                                                             abs=1e-4)
    assert (out / "images" / "obama" / "reference.png").is_file()


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write_rows(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=results.FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def test_torchrun_shards_the_grid_and_merges_one_results_csv(single_process_run, tmp_path):
    """torchrun, 2 CPU processes, resuming a run whose results.csv holds the grid's first image and a partial file
    left by an interrupted 3-process run its last: each process generates one of the two missing images into its own
    results-r<rank>.csv and rank 0 merges them. results.csv then holds the single process's rows: grid order, each
    image once, the rows done before kept as they were, the new ones with the same scores; rank 0's summary covers
    them all."""
    *_, reference_out = single_process_run
    reference = _rows(reference_out / "results.csv")  # obama: ws=0 seed 5, ws=0 seed 6, ws=1 seed 5, ws=1 seed 6
    out = tmp_path / "out"
    out.mkdir()
    _write_rows(out / "results.csv", reference[:1])
    _write_rows(out / "results-r2.csv", reference[3:])
    torchrun = Path(python_exe()).with_name("torchrun")
    command = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "invadapter_core.evaluate",
               *map(str, _grid(_obama(tmp_path / "data"), out))]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    log = tmp_path / "stderr.txt"  # a file, so that a run that times out still shows how far it came
    with open(log, "w") as stderr:
        try:
            done = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                  timeout=600)
        except subprocess.TimeoutExpired:
            pytest.fail("torchrun timed out; its stderr ends: " + log.read_text()[-6000:])
    err = log.read_text()
    assert done.returncode == 0, done.stdout[-2000:] + err[-6000:]
    for rank in (0, 1):
        assert f"rank {rank}: 1 of the 2 images to do (results-r{rank}.csv, device cpu)" in err
    assert not sorted(out.glob("results-r*.csv"))

    merged = _rows(out / "results.csv")
    key = lambda r: (r["identity"], r["prompt"], r["seed"], r["config"])  # noqa: E731
    assert [key(r) for r in merged] == [key(r) for r in reference]
    assert merged[0] == reference[0] and merged[3] == reference[3]  # not computed again ("seconds" included)
    for row, single in zip(merged[1:3], reference[1:3]):
        assert (out / row["image"]).is_file()
        for field in results.FIELDS:
            if field in results.METRICS and single[field]:
                assert float(row[field]) == pytest.approx(float(single[field]), abs=1e-4), field
            elif field != "seconds":
                assert row[field] == single[field], field

    summary = json.loads(done.stdout.strip().splitlines()[-1])  # rank 0's; the other process prints none
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["devices"] == ["cpu", "cpu"]
    assert summary["resumed"] == 2 and summary["generated"] == 2 and summary["images"] == 4
    expected = json.loads((reference_out / "summary.json").read_text())["configs"]
    assert [c["images"] for c in summary["configs"]] == [c["images"] for c in expected] == [2, 2]
    for mine, single in zip(summary["configs"], expected):
        for metric in results.METRICS:
            assert (mine[metric] is None) == (single[metric] is None), metric
            assert mine[metric] is None or mine[metric] == pytest.approx(single[metric], abs=1e-3), metric


def test_settings_grid_with_an_adapter_file_and_presets(tmp_path):
    from argparse import Namespace

    import torch

    from invadapter_core.adapter.eaa import InvAdapter, SelfEAA
    from invadapter_core.evaluate.pipeline import Nodes, PipelineError
    from invadapter_core.evaluate.run import EvaluationError, _configs
    from invadapter_core.adapter.weights import save_adapter

    torch.manual_seed(0)
    path = tmp_path / "weights" / "my-eval-adapter.safetensors"
    path.parent.mkdir()
    save_adapter(InvAdapter("SD15", 256, 16, {"input.1.0": SelfEAA(64, 64)}, {}, name="t"), str(path))
    nodes = Nodes()
    args = Namespace(adapter=["init from model", str(path)], weight_self=[0.5, 1.0, 0.5], weight_cross=[1.0],
                     block_weights=["none", "coarse"])
    configs = _configs(args, nodes)
    assert len(configs) == 8 and len({c.name for c in configs}) == 8  # repeated values count once
    assert configs[4].name == "my-eval-adapter.safetensors|ws=0.5|wc=1|bw=none"
    # the pack's loader node finds the file by the name the grid uses
    (adapter,) = nodes.pack_node("InvAdapterLoader", adapter_name=configs[4].adapter)
    assert adapter.reference_resolution == 256
    with pytest.raises(EvaluationError, match="unknown --block-weights medium; choose from none, all, coarse, fine"):
        _configs(Namespace(**{**vars(args), "block_weights": ["medium"]}), nodes)
    with pytest.raises(PipelineError, match="adapter 'gone.safetensors' is neither a file nor a file in ComfyUI's "
                                            "'invadapter' folders"):
        _configs(Namespace(**{**vars(args), "adapter": ["gone.safetensors"]}), nodes)
    with pytest.raises(PipelineError, match="passes no value for InvAdapterApply input.s. weight_cross"):
        nodes.pack_node("InvAdapterApply", model=None, weight_self=1.0)
    # every setting's choice is checked against the nodes' options before anything loads
    from invadapter_core.evaluate.pipeline import Generator, Settings

    Generator.validate(nodes, Settings())
    with pytest.raises(PipelineError, match="KSampler sampler_name 'eulerx' is not one of: euler"):
        Generator.validate(nodes, Settings(sampler="eulerx"))
    with pytest.raises(PipelineError, match="InvAdapterEncodeReference inversion 'newest' is not one of"):
        Generator.validate(nodes, Settings(inversion="newest"))


def _installed_comfyui(tmp_path: Path) -> Path:
    """A ComfyUI as a user has one: this pack in its custom_nodes (a symlink), its own models folder and an
    extra_model_paths.yaml. Its entries link to the test host's ComfyUI, except folder_paths.py, a copy: ComfyUI takes
    its folders from that file's real path."""
    import shutil

    from invadapter_core.comfyui.host import comfyui_path

    host = comfyui_path()
    comfy = tmp_path / "ComfyUI"
    comfy.mkdir()
    own = {"custom_nodes", "models", "input", "output", "user", "temp", "extra_model_paths.yaml", "folder_paths.py"}
    for entry in host.iterdir():
        if entry.name not in own:
            (comfy / entry.name).symlink_to(entry)
    shutil.copy(host / "folder_paths.py", comfy / "folder_paths.py")
    (comfy / "custom_nodes").mkdir()
    (comfy / "custom_nodes" / "ComfyUI-InvAdapter").symlink_to(ROOT)
    return comfy


def test_from_an_installed_comfyui_in_any_folder_with_its_model_paths(tmp_path, photos):
    """The pack inside a ComfyUI's custom_nodes, run from another folder with no COMFYUI_PATH: ComfyUI is found
    there, the checkpoint through that ComfyUI's extra_model_paths.yaml, the adapter in --base-directory's models
    folder; a refused run (here: a CLIP vision file that is nowhere) creates no --out."""
    pytest.importorskip("dlib")
    comfy = _installed_comfyui(tmp_path)
    elsewhere = tmp_path / "my-models"
    (elsewhere / "ckpts").mkdir(parents=True)
    (elsewhere / "ckpts" / "from-yaml.safetensors").symlink_to(models.shallow_sd15_checkpoint())
    _write(comfy / "extra_model_paths.yaml", f"mine:\n    base_path: {elsewhere}\n    checkpoints: ckpts\n")
    base = tmp_path / "base"
    (base / "models" / "invadapter").mkdir(parents=True)
    from invadapter_core.adapter.eaa import InvAdapter, SelfEAA
    from invadapter_core.adapter.weights import save_adapter

    save_adapter(InvAdapter("SD15", 256, 16, {"input.1.0": SelfEAA(64, 64)}, {}, name="t"),
                 str(base / "models" / "invadapter" / "from-base.safetensors"))
    data = tmp_path / "data" / "obama"
    data.mkdir(parents=True)
    (data / "1.jpg").symlink_to(faces.labelled_photos()["obama"])
    out = tmp_path / "out"
    command = [python_exe(), comfy / "custom_nodes" / "ComfyUI-InvAdapter" / "scripts" / "evaluate.py",
               data.parent, "--checkpoint", "from-yaml.safetensors", "--adapter", "from-base.safetensors",
               "--base-directory", base, "--prompt", "a photo", "--out", out, "--clip-vision", "nowhere.safetensors"]
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    run = subprocess.run(list(map(str, command)), cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-4000:]
    # both names resolved (else the error would be about them): the refusal is the CLIP vision file's, and its
    # search went through the base directory's models folder
    assert "error: CLIP vision model 'nowhere.safetensors' is neither a file nor a file in ComfyUI's 'clip_vision'" \
        in run.stderr, run.stderr[-4000:]
    assert str(base / "models" / "clip_vision") in run.stderr
    assert not out.exists()
