from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from . import register_method
from .common import fill_prompt, source_identity, source_text, weight_source_option
from ..errors import StudyError
from ..text import TEXT_LIMITS
from ..weights import check_safetensors, missing_model_message


@register_method("textual_inversion")
@dataclass(frozen=True)
class TextualInversion:
    """A learned token embedding; {subject} becomes `token`. Weight multiplies the embedding vector(s).

    SD1.5 files hold one tensor; SDXL files hold `clip_l` and `clip_g`, loaded into each encoder.
    """

    embedding: object = None  # WeightSource
    token: str = "<subject>"

    title = "Textual inversion"
    weight_option, weight_file_kind = "embedding", "embedding"
    default_weights = suggested_weights = (1.0,)
    weight_range = (0.0, 2.0)  # multiplies the learned embedding
    uses_references = False

    @classmethod
    def from_options(cls, options, *, base, base_dir, fail):
        source = weight_source_option(options.get("embedding"), "embedding", kind="embedding", base=base,
                                      base_dir=base_dir, fail=fail)
        token = str(options.get("token", "<subject>"))
        if not token.strip() or " " in token or len(token) > TEXT_LIMITS["token"]:
            raise fail(f"token: expected one word of at most {TEXT_LIMITS['token']} characters such as <chelsea>, "
                       f"got {token[:40]!r}{'...' if len(token) > 40 else ''}")
        return cls(source, token)

    def render_prompt(self, template, subject):
        return fill_prompt(template, self.token, subject.class_noun)

    def options(self):
        return {"embedding": source_text(self.embedding), "token": self.token}

    def identity(self):
        return {"kind": "textual_inversion", "embedding": source_identity(self.embedding), "token": self.token}

    def attach(self, pipe, study):
        return _TextualInversionAttachment(self, pipe)


class _TextualInversionAttachment:
    per_sample_weights = False  # the weight scales the text encoder's embedding rows: one per pipeline call

    def __init__(self, method: TextualInversion, pipe):
        self.pipe, self.token = pipe, method.token
        self.encoders = [(pipe.tokenizer, pipe.text_encoder)]
        if getattr(pipe, "text_encoder_2", None) is not None:
            self.encoders.append((pipe.tokenizer_2, pipe.text_encoder_2))
        self.loaded, self.rows = [], []
        try:
            self._load(method.embedding)
        except BaseException:
            self.release()
            raise

    def _load(self, source):
        path = source.local_file
        if path is None:
            try:
                from huggingface_hub import hf_hub_download

                path = hf_hub_download(source.repo, source.filename or "learned_embeds.safetensors",
                                       revision=source.revision)
            except Exception:
                raise StudyError(missing_model_message(source, "textual_inversion.embedding")) from None
        from safetensors.torch import load_file

        check_safetensors(path, "textual_inversion.embedding")  # a hub download can be damaged too
        state = load_file(str(path))
        for index, (tokenizer, encoder) in enumerate(self.encoders):
            if len(self.encoders) == 2:
                key = ("clip_l", "clip_g")[index]
                if key not in state:
                    raise StudyError(f"textual_inversion.embedding: {path} has no {key!r} tensor, needed for SDXL")
                embedding = state[key]
            elif len(state) == 1:
                embedding = next(iter(state.values()))
            else:
                embedding = state  # diffusers reads A1111 layouts (string_to_param, emb_params) itself
            before = len(tokenizer)
            try:
                self.pipe.load_textual_inversion(embedding if isinstance(embedding, dict) else {self.token: embedding},
                                                 token=self.token, tokenizer=tokenizer, text_encoder=encoder)
            except ValueError as error:
                raise StudyError(f"textual_inversion: {error}") from None
            ids = list(range(before, len(tokenizer)))
            self.loaded.append((tokenizer, encoder, tokenizer.convert_ids_to_tokens(ids)))
            self.rows.append((encoder, ids, encoder.get_input_embeddings().weight.data[ids].clone()))

    def call_kwargs(self, weights):
        if len(set(weights)) != 1:
            raise ValueError("textual_inversion: one weight per batch")
        with torch.no_grad():
            for encoder, ids, original in self.rows:
                encoder.get_input_embeddings().weight.data[ids] = original * weights[0]
        return {}

    def release(self):
        for tokenizer, encoder, tokens in self.loaded:  # only the tokens this attachment added
            self.pipe.unload_textual_inversion(tokens, tokenizer=tokenizer, text_encoder=encoder)
        self.loaded, self.rows = [], []
