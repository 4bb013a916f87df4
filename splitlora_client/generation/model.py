"""The split model as a transformers causal LM, so that transformers' own `generate` drives split generation.

`SplitCausalLM.forward` runs the client part (embeddings + its blocks, its adapter, its own key/value cache),
sends the new positions' activations to the server's inference session and returns the server's scores of the
next token as `logits` of the last position (u-shape: the server answers its blocks' output of the new positions
and the client's top part, with its own cache, computes the logits). Every decoding strategy of `generate` (greedy, sampling, beam search,
stop strings, logits processors) then works unchanged and matches the unsplit model token for token; beam search's
cache reordering is applied to the client's cache and sent to the server with the next step.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from common.split.parts import SplitPart
from splitlora_client.generation.remote import RemoteSession


class SplitCausalLM(PreTrainedModel, GenerationMixin):
    """A client part and a remote session factory, presented as a causal LM (one session per `generate` call)."""

    base_model_prefix = "client"
    main_input_name = "input_ids"

    def __init__(self, part: SplitPart, open_session: Callable[[], RemoteSession], codec: int = 1,
                 top: SplitPart | None = None) -> None:
        type(self).config_class = type(part.config)
        super().__init__(part.config)
        self.client = part.eval()
        self.top = top.eval() if top is not None else None  # u-shape: the client's top blocks, norm and head
        self.open_session, self.codec = open_session, codec
        self.session: RemoteSession | None = None
        self._reorder: torch.Tensor | None = None
        self.bytes_sent = self.bytes_received = 0
        self.steps = 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: Any = None, **kwargs: Any) -> CausalLMOutputWithPast:
        cache = cache if cache is not None else kwargs.get("past_key_values")
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape[0], past + input_ids.shape[1], dtype=torch.long)
        if position_ids is None:
            position_ids = torch.arange(past, past + input_ids.shape[1]).unsqueeze(0).expand(input_ids.shape[0], -1)
        if self.session is None or past == 0:
            self.close_session()
            self.session, self._reorder = self.open_session(), None  # a reorder after the last step is moot
        with torch.no_grad():
            hidden = self.client(input_ids, attention_mask, position_ids, cache=cache)
        answer = self.session.step(hidden, attention_mask, position_ids, self._reorder, self.codec)
        self._reorder = None
        self.bytes_sent += answer.bytes_sent
        self.bytes_received += answer.bytes_received
        self.steps += 1
        return CausalLMOutputWithPast(logits=self._logits(answer.scores, attention_mask, position_ids, cache),
                                      cache=cache)

    @torch.no_grad()
    def _logits(self, scores: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                cache: Any) -> torch.Tensor:
        """(rows, 1, vocab) scores of the next token: the server's, or in u-shape mode the top part's on the server's
        hidden states of the new positions (its blocks keep their keys and values in the same cache: its layers
        are indexed as in the whole model)."""
        if self.top is None:
            return scores[:, None, :]
        blocks_cache = cache if len(self.top.layer_range()) else None
        return self.top(scores, attention_mask, position_ids, cache=blocks_cache)[:, -1:, :].float()

    def _reorder_cache(self, cache: Any, beam_idx: torch.Tensor) -> Any:
        """Beam search: reorder the client's cache now and the server's with the next step."""
        cache.reorder_cache(beam_idx)
        self._reorder = beam_idx if self._reorder is None else self._reorder[beam_idx]
        return cache

    def close_session(self) -> None:
        """End the server session of the last `generate` call, if one is open."""
        if self.session is not None:
            self.session.close()
            self.session = None

    def generate(self, *args: Any, **kwargs: Any):  # type: ignore[override]
        """transformers' `generate`, in a fresh server session that ends with the call."""
        try:
            return super().generate(*args, **kwargs)
        finally:
            self.close_session()
