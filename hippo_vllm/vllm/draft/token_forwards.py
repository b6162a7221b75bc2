"""The draft engine's forwards of token ids only: a chunk's steps (a mixin of ``DraftEngine``).

A chunk's first step feeds each request's refed and corrected tokens
(:meth:`TokenForwards.run_tokens`); its later steps feed one drafted token per
request (:meth:`TokenForwards.run_greedy`). Token ids go into the model's
forward, which embeds them itself (a DeepStack draft and decode graphs take
embedded rows: ``DraftEngine._forward_rows``), so these steps build no
per-request inputs.

It reads the engine's ``kv``, ``device``, ``decode_graphs``, ``_run_batch``,
``_forward_rows``, ``_undone_on_failure`` and ``_as_draft``.
"""

from __future__ import annotations

import itertools

import torch


class TokenForwards:
    """See the module docstring."""

    @torch.inference_mode()
    def run_tokens(self, req_ids: list[str], query_lens: list[int], token_ids: torch.Tensor,
                   positions: torch.Tensor) -> torch.Tensor:
        """:meth:`DraftEngine.run` of token ids only: request ``i`` appends its next ``query_lens[i]``
        tokens; ``token_ids`` ``[N]`` and their positions ``[N]`` (text: the three M-RoPE rows
        equal) in request order. Returns the logits of each request's last row."""
        num_rows = (sum(query_lens),)
        if (len(set(req_ids)) != len(req_ids) or len(query_lens) != len(req_ids) or min(query_lens, default=0) < 1
                or token_ids.shape != num_rows or positions.shape != num_rows):
            raise ValueError(f"run_tokens: at least one token per request and a position per token, got "
                             f"{len(req_ids)} requests, query_lens {query_lens}, token_ids "
                             f"{tuple(token_ids.shape)}, positions {tuple(positions.shape)}")

        def forward(order: list[int]) -> torch.Tensor:
            reordered = order != sorted(order)
            batch_ids, lens, ids, pos = req_ids, query_lens, token_ids, positions
            if reordered:  # the request rows in the backend's order (see _batch_order)
                starts = [0, *itertools.accumulate(query_lens)]
                index = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in order])
                batch_ids, lens = [req_ids[i] for i in order], [query_lens[i] for i in order]
                ids, pos = token_ids[index], positions[index]
            logits = self._forward_rows(batch_ids, lens, ids.to(self.device, torch.int64), _rows3(pos, self.device))
            return logits[torch.tensor(order).argsort().to(self.device)] if reordered else logits

        return self._run_batch(req_ids, query_lens, forward)

    def run_decode(self, req_ids: list[str], token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """:meth:`run_tokens` of one token per request."""
        return self.run_tokens(req_ids, [1] * len(req_ids), token_ids, positions)

    @torch.inference_mode()
    def run_greedy(self, req_ids: list[str], token_ids: torch.Tensor, positions: torch.Tensor,
                   steps: int) -> torch.Tensor:
        """``steps`` one-token forwards: each request feeds its token of ``token_ids`` ``[R]`` at
        its position of ``positions`` ``[R]``, then each step's argmax at the next position.
        Returns the argmaxes, ``[R, steps]`` (int64, on the draft's device).

        Every step's KV rows are reserved first, all or nothing: a ``DraftCapacityError``
        leaves every request as it was, and so does a step that fails. The block table and
        slots are worked out once for all steps (``DecodeSteps``). With decode graphs, each
        step replays one and reserves its own row (graphs read the KV lengths step by step);
        a failing step, capacity included, still leaves every request as it was.
        """
        if len(set(req_ids)) != len(req_ids) or token_ids.shape != (len(req_ids),) or positions.shape != token_ids.shape:
            raise ValueError(f"run_greedy: one token and position per request, got {len(req_ids)} requests, "
                             f"token_ids {tuple(token_ids.shape)}, positions {tuple(positions.shape)}")
        if steps < 1:
            raise ValueError(f"run_greedy: steps must be >= 1, got {steps}")
        drafted = torch.empty((len(req_ids), steps), dtype=torch.int64, device=self.device)
        tokens = token_ids.to(self.device, torch.int64)
        first_rows = _rows3(positions, self.device)
        # Decode graphs read the KV lengths step by step: each step reserves its own row then.
        graphs = self.decode_graphs is not None and self.decode_graphs.covers([1] * len(req_ids))
        ones = [1] * len(req_ids)
        with self._undone_on_failure(req_ids):
            plan = None if graphs else self.kv.reserve_steps(req_ids, steps)
            with self._as_draft():
                for step in range(steps):
                    if plan is None:
                        logits = self.run_decode(req_ids, tokens, first_rows[0] + step)
                    else:
                        logits = self._forward_rows(req_ids, ones, tokens, first_rows + step, batch=plan.batch(step))
                    tokens = drafted[:, step] = logits.argmax(dim=-1)
        return drafted


def _rows3(positions: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``[3, N]`` M-RoPE positions of text tokens at 1-D ``positions`` (the three rows equal)."""
    return positions.to(device, torch.int64).expand(3, -1).contiguous()
