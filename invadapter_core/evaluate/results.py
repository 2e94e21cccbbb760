"""The per-image CSV (one row per identity x prompt x seed x setting, appended and synced as each image is done,
so an interrupted run resumes where it stopped), the run's settings (a resumed run must match them) and the summary
(one JSON object, averaged per setting).

Under torchrun each process appends to its own partial file (results-r<rank>.csv); ``merge_results`` folds them into
results.csv, in the grid's order, each image once (it runs before the grid, so partials of an interrupted run with
any number of processes count as done, and after it)."""
from __future__ import annotations

import csv
import json
import math
import os
import re
from pathlib import Path

FIELDS = ["identity", "prompt_index", "prompt", "seed", "config", "adapter", "weight_self", "weight_cross",
          "block_weights", "image", "face_found", "face_sim", "face_raw", "face_sim_other_photos", "real_photo_sim",
          "copy_paste", "clip_t", "clip_i", "seconds"]
METRICS = ["face_sim", "face_raw", "face_sim_other_photos", "real_photo_sim", "copy_paste", "clip_t", "clip_i"]
CSV_NAME, RUN_NAME, SUMMARY_NAME = "results.csv", "run.json", "summary.json"
PARTIAL = re.compile(r"results-r(\d+)\.csv")


def partial_name(rank: int) -> str:
    return f"results-r{rank}.csv"


def partial_files(out_dir: Path) -> list[Path]:
    """The partial files in ``out_dir``, by rank (of any earlier number of processes too)."""
    found = [p for p in out_dir.glob("results-r*.csv") if PARTIAL.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(PARTIAL.fullmatch(p.name).group(1)))


class ResumeMismatch(ValueError):
    pass


def row_key(identity: str, prompt: str, seed, config: str) -> tuple[str, str, str, str]:
    return identity, prompt, str(seed), config


def _cell(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


class ResultsFile:
    def __init__(self, out_dir: Path, name: str = CSV_NAME):
        self.path = out_dir / name
        self.rows: list[dict] = []
        if self.path.exists():
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):  # a row torn by the interruption: drop it, it is redone
                self.path.write_bytes(data[:data.rfind(b"\n") + 1])
            with open(self.path, newline="", encoding="utf-8") as f:
                self.rows = [r for r in csv.DictReader(f) if all(r.get(k) is not None for k in FIELDS)]
        self._done = {row_key(r["identity"], r["prompt"], r["seed"], r["config"]) for r in self.rows}

    def done(self, key: tuple) -> bool:
        return key in self._done

    def append(self, row: dict) -> None:
        new = not self.path.exists() or self.path.stat().st_size == 0
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                writer.writeheader()
            writer.writerow({k: _cell(row[k]) for k in FIELDS})
            f.flush()
            os.fsync(f.fileno())
        self.rows.append({k: _cell(row[k]) for k in FIELDS})
        self._done.add(row_key(row["identity"], row["prompt"], row["seed"], row["config"]))


def merge_results(out_dir: Path, order: dict[tuple, int]) -> None:
    """Fold the partial files in ``out_dir`` into results.csv, each image once (results.csv's row, else the lowest
    rank's), rows in the grid's order (``order``: row key -> position; rows of keys not in it, from a grid that has
    since changed, after them, as they were), and delete the partials. One process only, while no other writes.
    results.csv is replaced in one step and only when this changes it; a crash at any point loses nothing."""
    partials = partial_files(out_dir)
    merged = ResultsFile(out_dir)
    rows = {row_key(r["identity"], r["prompt"], r["seed"], r["config"]): r for r in merged.rows}
    for partial in partials:
        for row in ResultsFile(out_dir, partial.name).rows:
            rows.setdefault(row_key(row["identity"], row["prompt"], row["seed"], row["config"]), row)
    keys = sorted(rows, key=lambda key: order.get(key, len(order)))  # stable: the rest keep their order
    if keys != list(rows) or len(rows) != len(merged.rows):
        temporary = out_dir / (CSV_NAME + ".tmp")
        with open(temporary, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows({k: rows[key][k] for k in FIELDS} for key in keys)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, merged.path)
    for partial in partials:
        partial.unlink()


def _flat(run: dict, prefix: str = "") -> dict:
    """{"settings": {"steps": 20}} -> {"settings.steps": 20}, so a change is named by its own key."""
    flat = {}
    for key, value in run.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def verify_run(out_dir: Path, run: dict, restart: bool, name=lambda key: key) -> None:
    """ResumeMismatch when ``out_dir`` holds a run with other settings (each change named by ``name(key)``, old ->
    new); writes nothing. A resumed run must have the same settings (the grid of adapters and weights may grow)."""
    path = out_dir / RUN_NAME
    if restart or not path.exists():
        return
    old, new = _flat(json.loads(path.read_text())), _flat(run)
    changed = [f"{name(k)} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
               if old.get(k) != new.get(k)]
    if changed:
        raise ResumeMismatch(f"{out_dir} holds a run with other settings ({'; '.join(changed)}): run with the "
                             f"same settings to resume it, use another --out, or --restart to discard the results "
                             f"there")


def check_run(out_dir: Path, run: dict, restart: bool, name=lambda key: key) -> None:
    """verify_run, then write run.json (``restart``: after deleting the results there)."""
    verify_run(out_dir, run, restart, name)
    if restart:
        for file in (CSV_NAME, RUN_NAME, SUMMARY_NAME, *(p.name for p in partial_files(out_dir))):
            (out_dir / file).unlink(missing_ok=True)
    path = out_dir / RUN_NAME
    if not path.exists():
        path.write_text(json.dumps(run, indent=1, sort_keys=True))


def _mean(values) -> float | None:
    numbers = [float(v) for v in values if v not in ("", None)]
    numbers = [v for v in numbers if not math.isnan(v)]
    return round(sum(numbers) / len(numbers), 4) if numbers else None


def summarize(rows: list[dict], configs: list) -> list[dict]:
    """Per setting (in grid order): counts and the mean of every metric over the rows that have it."""
    out = []
    for config in configs:
        mine = [r for r in rows if r["config"] == config.name]
        entry = {"config": config.name, "adapter": config.adapter, "weight_self": config.weight_self,
                 "weight_cross": config.weight_cross, "block_weights": config.block_weights, "images": len(mine),
                 "no_face": sum(1 for r in mine if r["face_found"] != "True")}
        entry.update({m: _mean(r[m] for r in mine) for m in METRICS})
        out.append(entry)
    return out
