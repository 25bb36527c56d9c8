"""Prompts longer than the CLIP text encoder reads: SD's encoders and CLIP-T keep only the first 77 tokens."""

from __future__ import annotations

from functools import lru_cache

CLIP_MAX_TOKENS = 77  # start and end tokens included


@lru_cache(maxsize=1)
def _clip_bpe():
    # open_clip ships the CLIP BPE vocabulary, so this works offline without any model download.
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def token_limit(tokenizer=None) -> int:
    """Tokens the text encoder reads: the tokenizer's model_max_length (77 for SD and CLIP)."""
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit and limit < 100_000 else CLIP_MAX_TOKENS  # huge: the tokenizer sets no limit


def token_count(text: str, tokenizer=None) -> int:
    """Tokens `text` becomes, start and end tokens included: with `tokenizer` (a pipeline's), else CLIP's BPE."""
    if tokenizer is None:
        return len(_clip_bpe().encode(text)) + 2
    return len(tokenizer.tokenize(text)) + tokenizer.num_special_tokens_to_add()


def too_long(text: str, tokenizer=None) -> bool:
    """Does the text encoder cut `text`?"""
    return token_count(text, tokenizer) > token_limit(tokenizer)


def long_texts(study, tokenizer=None) -> dict[str, int]:
    """{text: tokens} of each prompt a cell is generated or CLIP-T scored with that is longer than the limit."""
    texts = {study.render_prompt(cell) for cell in study.cells()} | {study.scoring_prompt(p) for p in study.prompts}
    counts = {text: token_count(text, tokenizer) for text in texts}
    return {text: count for text, count in counts.items() if count > token_limit(tokenizer)}


def cell_truncated(study, cell, long: dict[str, int]) -> bool:
    """Is the cell's prompt, or its CLIP-T text, among the `long` texts?"""
    return study.render_prompt(cell) in long or study.scoring_prompt(cell.template) in long


def truncation_warnings(study, tokenizer=None) -> list[str]:
    """One line per prompt of `study` that the text encoder cuts (empty when none is)."""
    long = long_texts(study, tokenizer)
    lines = []
    for index, template in enumerate(study.prompts):
        counts = [long[t] for t in {study.render_prompt(c) for c in study.cells() if c.prompt_index == index}
                  | {study.scoring_prompt(template)} if t in long]
        if counts:
            lines.append(f"{study.source}: prompts[{index}]: {max(counts)} tokens, more than the "
                         f"{token_limit(tokenizer)} the CLIP text encoder reads; the rest is truncated when "
                         "generating and when scoring CLIP-T (cells.csv: prompt_truncated)")
    negative = study.negative_prompt
    if negative and too_long(negative, tokenizer):
        lines.append(f"{study.source}: negative_prompt: {token_count(negative, tokenizer)} tokens, more than the "
                     f"{token_limit(tokenizer)} the CLIP text encoder reads; the rest is truncated in every cell")
    return lines


def truncation_note(prompt_indices: list[int]) -> str:
    """A sentence for the app's status line naming the prompts (1-based) cut at the token limit."""
    if not prompt_indices:
        return ""
    names = ", ".join(str(i + 1) for i in prompt_indices)
    many = len(prompt_indices) > 1
    return (f"Prompt{'s' if many else ''} {names} {'are' if many else 'is'} longer than the {CLIP_MAX_TOKENS} "
            "tokens CLIP reads: the end was ignored when generating and scoring.")
