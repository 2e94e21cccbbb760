"""The identity token in a real prompt: its k embeddings take the place of a placeholder word in ComfyUI's own
tokenize / encode path, as textual-inversion embeddings do (``comfy.sd1_clip``'s ``process_tokens`` takes embedding
tensors among the token ids and inserts them before the text transformer, so the result is differentiable in them).

The placeholder (``PLACEHOLDER``, "sks": a rare word, as DreamBooth's identifier) is written in the prompt where the
person goes ("a photo of sks person in the snow"); each of its occurrences becomes the k identity embeddings, and the
chunk keeps its length (padding given up or added at its end). The map starts from the placeholder's own embedding
(the mean of its tokens' rows), so an untrained token (k = 1, one-token placeholder) gives the plain prompt's
conditioning exactly. Text encoders with one tokenizer (SD1.x's CLIP-L, SD2.x's OpenCLIP-H) are served; others
(SDXL's two encoders, T5) are refused in one line.
"""
from __future__ import annotations

import torch

PLACEHOLDER = "sks"


def _single(clip) -> tuple[str, object]:
    """(tokenizer key, the text model) of a CLIP with one text encoder; one line otherwise."""
    encoder = clip.cond_stage_model
    keys = list(clip.tokenize("").keys())
    inner = getattr(encoder, getattr(encoder, "clip", ""), None)
    if len(keys) != 1 or inner is None or not hasattr(inner, "transformer"):
        raise ValueError(f"the identity token enters prompts of text encoders with one tokenizer (SD1.x, SD2.x); this "
                         f"CLIP has {len(keys)} ({', '.join(keys)}): use an SD1.x or SD2.x checkpoint's CLIP")
    return keys[0], inner


def token_width(clip) -> int:
    """The width of the text encoder's token embeddings."""
    _, inner = _single(clip)
    return int(inner.transformer.get_input_embeddings().weight.shape[1])


def placeholder_ids(clip, placeholder: str = PLACEHOLDER) -> list[int]:
    """The token ids the placeholder word tokenizes into (between the start token and the end of its chunk)."""
    key, _ = _single(clip)
    if not placeholder.strip() or placeholder != placeholder.strip() or " " in placeholder:
        raise ValueError(f"placeholder {placeholder!r}: give one word without spaces (e.g. {PLACEHOLDER!r})")
    empty = [t[0] for t in clip.tokenize("")[key][0]]
    word = [t[0] for t in clip.tokenize(placeholder)[key][0]]
    start = next(i for i, (a, b) in enumerate(zip(empty, word)) if a != b)
    ids = word[start:word.index(empty[start], start)]
    if not ids:
        raise ValueError(f"placeholder {placeholder!r} tokenizes to nothing: give a word")
    return ids


def placeholder_embedding(clip, placeholder: str = PLACEHOLDER) -> torch.Tensor:
    """[width]: the mean of the placeholder's token embeddings (where the identity token map starts)."""
    _, inner = _single(clip)
    table = inner.transformer.get_input_embeddings().weight
    return table[torch.tensor(placeholder_ids(clip, placeholder), device=table.device)].float().mean(0).detach().cpu()


def insert_tokens(clip, text: str, embeddings: torch.Tensor, placeholder: str = PLACEHOLDER) -> dict:
    """ComfyUI's token lists of ``text`` with every occurrence of the placeholder replaced by ``embeddings``
    ([k, width]); refuses a prompt without the placeholder, or with no room left in its chunk."""
    key, _ = _single(clip)
    ids = placeholder_ids(clip, placeholder)
    pad = clip.tokenize("")[key][0][-1]
    tokens = clip.tokenize(text)
    chunks, found = [], 0
    for chunk in tokens[key]:
        out, i = [], 0
        while i < len(chunk):
            if _ids(chunk[i:i + len(ids)]) == ids:
                weight = chunk[i][1]
                out += [(row, weight, *chunk[i][2:]) for row in embeddings]
                i += len(ids)
                found += 1
            else:
                out.append(chunk[i])
                i += 1
        while len(out) > len(chunk) and len(out) > 1 and _is_pad(out[-1], pad) and _is_pad(out[-2], pad):
            out.pop()  # trailing padding makes room (the end token itself stays)
        if len(out) > len(chunk):
            raise ValueError(f"no room for {len(embeddings)} identity token(s) in the prompt's "
                             f"{len(chunk)}-token chunk: shorten the prompt")
        out += [pad] * (len(chunk) - len(out))
        chunks.append(out)
    if not found:
        raise ValueError(f"the prompt has no placeholder word {placeholder!r}: write it where the person goes "
                         f"(e.g. 'a photo of {placeholder} person')")
    return {key: chunks}


def _ids(entries) -> list:
    """The token ids of ``entries`` (an embedding already in the prompt matches no id)."""
    return [t[0] if isinstance(t[0], int) else None for t in entries]


def _is_pad(entry, pad) -> bool:
    return isinstance(entry[0], int) and entry[0] == pad[0]


def encode_with_tokens(clip, text: str, embeddings: torch.Tensor, placeholder: str = PLACEHOLDER):
    """CONDITIONING of ``text`` with the identity embeddings in place of the placeholder (what CLIPTextEncode
    returns for a prompt)."""
    check_placeholder_width(clip, embeddings)
    return clip.encode_from_tokens_scheduled(insert_tokens(clip, text, embeddings, placeholder))


def check_placeholder_width(clip, embeddings: torch.Tensor) -> None:
    width = token_width(clip)
    if embeddings.shape[-1] != width:
        raise ValueError(f"the identity token is {embeddings.shape[-1]}-d, this text encoder's token embeddings are "
                         f"{width}-d: use the CLIP of the checkpoint the adapter was trained for")


def identity_conditioning(model, clip, adapter, reference, text: str, placeholder: str = PLACEHOLDER):
    """CONDITIONING of ``text`` with the adapter's identity token of ``reference`` (read by ``model``, the family it
    was encoded with) in place of the placeholder; one line for an adapter without a token map or one that does
    not fit this model or text encoder."""
    from .fit import check_reference_fits
    from .identity_token import check_width, reference_tokens

    token = getattr(adapter, "identity_token", None)
    if token is None:
        raise ValueError(f"Inv-Adapter '{adapter.name}' has no identity token: load weights trained with "
                         f"model.identity_tokens > 0, or encode the prompt with CLIP Text Encode")
    check_reference_fits(model, reference)
    check_width(token, token_width(clip), f"Inv-Adapter '{adapter.name}'")
    return encode_with_tokens(clip, text, reference_tokens(model, token, reference)[0].cpu(), placeholder)
