"""The draft engine's forwards of token ids only: a chunk's steps (a mixin of ``DraftEngine``).

A chunk's first step feeds each request's refed and corrected tokens, its later
steps one drafted token per request: :meth:`TokenForwards.run_greedy` runs them all
with their KV rows reserved at once; :meth:`TokenForwards.run_tokens` /
:meth:`TokenForwards.run_decode` run one forward (where those rows do not all
fit). Token ids go into the model's forward, which embeds them itself (a
DeepStack draft and decode graphs take embedded rows:
``DraftEngine._forward_rows``), so these steps build no per-request inputs.

It reads the engine's ``kv``, ``device``, ``decode_graphs``, ``_run_batch``,
``_batch_order``, ``_forward_rows``, ``_undone_on_failure`` and ``_as_draft``.
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
        _check_rows("run_tokens", req_ids, query_lens, token_ids, positions)

        def forward(order: list[int]) -> torch.Tensor:
            batch_ids, lens, ids, pos = _in_order(order, req_ids, query_lens, token_ids, positions)
            logits = self._forward_rows(batch_ids, lens, ids.to(self.device, torch.int64), _rows3(pos, self.device))
            return in_request_order(logits, order)

        return self._run_batch(req_ids, query_lens, forward)

    def run_decode(self, req_ids: list[str], token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """:meth:`run_tokens` of one token per request."""
        return self.run_tokens(req_ids, [1] * len(req_ids), token_ids, positions)

    @torch.inference_mode()
    def run_greedy(self, req_ids: list[str], query_lens: list[int], token_ids: torch.Tensor,
                   positions: torch.Tensor, steps: int) -> torch.Tensor:
        """A whole chunk, ``steps`` forwards: the first appends each request's next ``query_lens[i]``
        tokens (``token_ids`` ``[N]`` at ``positions`` ``[N]``, in request order, as
        :meth:`run_tokens`), each later one the previous forward's argmax at the next position.
        Returns the argmaxes, ``[R, steps]`` (int64, on the draft's device).

        Every forward's KV rows are reserved first, all or nothing: a ``DraftCapacityError``
        leaves every request as it was, and so does a forward that fails. The block table
        and slots are worked out once for all of them (``ChunkSteps``). With decode graphs,
        each later step replays one and reserves its own row (graphs read the KV lengths step
        by step); a failing step, capacity included, still leaves every request as it was.
        """
        _check_rows("run_greedy", req_ids, query_lens, token_ids, positions)
        if steps < 1:
            raise ValueError(f"run_greedy: steps must be >= 1, got {steps}")
        # The whole chunk in the backend's order for its first forward (see _batch_order).
        order = self._batch_order(query_lens)
        req_ids, query_lens, token_ids, positions = _in_order(order, req_ids, query_lens, token_ids, positions)
        drafted = torch.empty((len(req_ids), steps), dtype=torch.int64, device=self.device)
        first_rows = _rows3(positions, self.device)
        # Each request's position after its last fed token: where its first drafted token goes.
        next_rows = first_rows[:, [end - 1 for end in itertools.accumulate(query_lens)]] + 1
        # Decode graphs read the KV lengths step by step: each later step reserves its own row then.
        graphs = self.decode_graphs is not None and self.decode_graphs.covers([1] * len(req_ids))
        ones = [1] * len(req_ids)
        with self._undone_on_failure(req_ids):
            plan = self.kv.reserve_chunk(req_ids, query_lens, 0 if graphs else steps - 1)
            with self._as_draft():
                # With decode graphs a one-token first step replays one, which builds its own metadata.
                logits = self._forward_rows(req_ids, query_lens, token_ids.to(self.device, torch.int64), first_rows,
                                            batch=None if graphs else plan.first())
                tokens = drafted[:, 0] = logits.argmax(dim=-1)
                for step in range(steps - 1):
                    if graphs:
                        logits = self.run_decode(req_ids, tokens, next_rows[0] + step)
                    else:
                        logits = self._forward_rows(req_ids, ones, tokens, next_rows + step, batch=plan.later(step))
                    tokens = drafted[:, step + 1] = logits.argmax(dim=-1)
        return in_request_order(drafted, order)


def _check_rows(name: str, req_ids: list[str], query_lens: list[int], token_ids: torch.Tensor,
                positions: torch.Tensor) -> None:
    num_rows = (sum(query_lens),)
    if (len(set(req_ids)) != len(req_ids) or len(query_lens) != len(req_ids) or min(query_lens, default=0) < 1
            or token_ids.shape != num_rows or positions.shape != num_rows):
        raise ValueError(f"{name}: at least one token per request and a position per token, got "
                         f"{len(req_ids)} requests, query_lens {query_lens}, token_ids "
                         f"{tuple(token_ids.shape)}, positions {tuple(positions.shape)}")


def _in_order(order: list[int], req_ids: list[str], query_lens: list[int], token_ids: torch.Tensor,
              positions: torch.Tensor) -> tuple[list[str], list[int], torch.Tensor, torch.Tensor]:
    """The requests and their rows in ``order`` (as given when that is their order)."""
    if order == sorted(order):
        return req_ids, query_lens, token_ids, positions
    starts = [0, *itertools.accumulate(query_lens)]
    index = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in order])
    return [req_ids[i] for i in order], [query_lens[i] for i in order], token_ids[index], positions[index]


def in_request_order(rows: torch.Tensor, order: list[int]) -> torch.Tensor:
    """``rows`` of the requests in ``order`` (the backend's, see ``DraftEngine._batch_order``) back
    in request order (as given when that was their order)."""
    if order == sorted(order):
        return rows
    return rows[torch.tensor(order).argsort().to(rows.device)]


def _rows3(positions: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``[3, N]`` M-RoPE positions of text tokens at 1-D ``positions`` (the three rows equal)."""
    return positions.to(device, torch.int64).expand(3, -1).contiguous()
