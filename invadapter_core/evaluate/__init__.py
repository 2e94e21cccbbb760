"""The paper's evaluation as one command: ``python -m invadapter_core.evaluate --help`` (README, "Evaluation").

Modules: dataset (identities x prompts from a folder or a JSONL manifest), pipeline (generation through the pack's
and ComfyUI's node classes), metrics (FACE-SIM, CLIP-T, CLIP-I), results (the per-image CSV, resume, the summary).
Importing this package does not import ComfyUI.
"""
