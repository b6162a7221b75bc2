"""How the draft's side prefills requests: a mixin of ``DraftWorker``.

A new request's prefill takes its items' encodings (done when it arrived, or
here), its view (which prompt rows the draft keeps), the view's input rows, and
one forward that writes its compact prompt into the draft's KV cache. The new
requests of one step do each of these together: their items in as few encoder
calls as fit, their videos scored in one call, their rows embedded in one call,
their prompts in shared forwards. If a shared call fails, each request does it
alone, so only the request at fault is blamed (a ``DraftFailure`` of its own)
and the others go on; lack of draft KV puts a request in ``no_room``.

It reads the worker's ``engine``, ``views``, ``recent_encodes``,
``prefill_chunk_tokens``, ``_prompts``, ``_states`` and ``_encoded``.
"""

from __future__ import annotations

import dataclasses

import torch

from hippo_vllm.logs import get_logger
from hippo_vllm.vllm.draft.batching import consecutive_groups
from hippo_vllm.vllm.draft.chunk_drafting import DraftState
from hippo_vllm.vllm.draft.engine import DraftCapacityError, DraftInput
from hippo_vllm.vllm.draft.prompt_rows import PromptToEmbed
from hippo_vllm.vllm.draft.view import DraftView
from hippo_vllm.vllm.protocol import DraftFailure, DraftPrompt, Prefill, StepResult, ViewReport

logger = get_logger(__name__)


class DraftPrefills:
    """The worker's prefills; see the module docstring."""

    def _prefill_all(self, prefills: list[Prefill], result: StepResult) -> None:
        """Each request's compact prompt into the draft's KV cache, several per forward."""
        for prefill in prefills:
            if prefill.prompt is not None:
                self._prompts[prefill.req_id] = prefill.prompt
        self._encode_together([(p.req_id, self._prompts[p.req_id].mm_features) for p in prefills
                               if self._needs_encode(p)], result)
        self._build_views_together([p for p in prefills if self._needs_view(p)], result)
        self._embed_together([p.req_id for p in prefills if self._needs_rows(p.req_id)])
        ready = []
        for prefill in prefills:
            req_id = prefill.req_id
            try:
                prepared = self._prepare_prefill(req_id, prefill.attention, result)
            except DraftCapacityError:
                result.no_room.append(req_id)  # drafting pauses; the target's side retries
            except Exception as exc:  # noqa: BLE001 - this request only
                result.failures.append(DraftFailure.from_exception(req_id, "draft prefill", exc))
            else:
                if prepared is not None:
                    ready.append(prepared)
        for group in consecutive_groups(ready, _rows, self.prefill_chunk_tokens):
            if len(group) > 1 and self._prefill_together(group):
                continue
            for prepared in group:
                self._prefill_alone(prepared, result)

    def _prefill_together(self, group: list[_PreparedPrefill]) -> bool:
        """One forward for the group; False if it failed (rolled back: each goes alone then,
        which finds the culprit or the room)."""
        try:
            self.engine.run([DraftInput(p.req_id, p.positions, inputs_embeds=p.embeds) for p in group])
        except Exception:  # noqa: BLE001 - see the docstring
            return False
        self._states.update((p.req_id, p.state) for p in group)
        return True

    def _prefill_alone(self, prepared: _PreparedPrefill, result: StepResult) -> None:
        req_id, engine, step = prepared.req_id, self.engine, self.prefill_chunk_tokens
        try:
            # In pieces of at most max_num_batched_tokens rows, like the target's own
            # prefill: bounded activations, and the sizes a compiled model accepts.
            for start in range(0, prepared.positions.shape[1], step):
                rows = slice(start, start + step)
                engine.run([DraftInput(req_id, prepared.positions[:, rows], inputs_embeds=prepared.embeds[rows])])
        except DraftCapacityError:
            engine.free(req_id)  # no half-prefilled draft sequence stays behind
            result.no_room.append(req_id)
        except Exception as exc:  # noqa: BLE001 - this request only
            engine.free(req_id)
            result.failures.append(DraftFailure.from_exception(req_id, "draft prefill", exc))
        else:
            self._states[req_id] = prepared.state

    def _prepare_prefill(self, req_id: str, attention: list[torch.Tensor | None] | None,
                         result: StepResult) -> _PreparedPrefill | None:
        """The request's view and input rows (None: already prefilled)."""
        if req_id in self._states:
            return None  # already prefilled (the target's side may not know a chunk found no room)
        prompt = self._prompts.get(req_id)
        if prompt is None:
            raise RuntimeError(f"request {req_id!r} has no draft prompt on the draft's side to prefill")
        engine = self.engine
        engine.free(req_id)
        view = self.views.get(req_id)  # a resumed request keeps its view (or built with others')
        if view is None and self.views.reusable(prompt, attention) is not None:
            view = self._new_view(req_id, prompt, None, attention, result)  # a prefix-cache hit
        if view is not None:
            self._check_room(req_id, view)  # before embedding anything
        item_embeds = self._encoded.pop(req_id, None)  # encoded when the request arrived, or this step
        embeds = self.views.rows(req_id, engine.device) if view is not None else None
        if embeds is None:
            if item_embeds is None:
                item_embeds = self._encode(prompt.mm_features, result) if prompt.mm_features else []
            if view is None:
                view = self._new_view(req_id, prompt, item_embeds, attention, result)
            embeds = engine.embed_prompts([self._to_embed(req_id, item_embeds, view)])[0]
            self.views.keep_rows(req_id, embeds)
        self._check_room(req_id, view)
        return _PreparedPrefill(req_id, DraftState(view, prompt.mrope_delta), prompt.positions[:, view.keep_rows],
                                embeds)

    def _new_view(self, req_id: str, prompt: DraftPrompt, item_embeds: list[torch.Tensor] | None,
                  attention: list[torch.Tensor | None] | None, result: StepResult) -> DraftView:
        view = self.views.build(req_id, prompt, self._visual(item_embeds), attention)
        result.views.append(_report(req_id, view))
        return view

    def _visual(self, item_embeds: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
        # Scores see each row's embedding only, not the DeepStack features a Qwen3-VL
        # encoder appends to it.
        return None if item_embeds is None else [e[:, : self.engine.hidden_size] for e in item_embeds]

    def _needs_view(self, prefill: Prefill) -> bool:
        """A new request's prefill whose view is to build from its items (encoded on arrival or this step)."""
        prompt, req_id = self._prompts.get(prefill.req_id), prefill.req_id
        return (prompt is not None and req_id in self._encoded and req_id not in self._states
                and req_id not in self.views and self.views.reusable(prompt, prefill.attention) is None)

    def _build_views_together(self, prefills: list[Prefill], result: StepResult) -> None:
        """The new views of a step's prefills, their videos scored together. If that fails,
        each prefill builds its own view, so the request at fault is blamed."""
        if len(prefills) < 2:
            return  # its prefill builds it
        try:
            views = self.views.build_new([
                (p.req_id, self._prompts[p.req_id], self._visual(self._encoded[p.req_id]), p.attention)
                for p in prefills
            ])
        except Exception:  # noqa: BLE001 - see the docstring
            return
        result.views.extend(_report(p.req_id, view) for p, view in zip(prefills, views))

    def _needs_rows(self, req_id: str) -> bool:
        """A new request with its view (built with the step's others) and encoded items, whose
        input rows are still to embed, and room for them in the draft's KV cache."""
        view = self.views.get(req_id)
        return (view is not None and req_id not in self._states and req_id in self._encoded
                and self.views.rows(req_id, self.engine.device) is None
                and self.engine.has_room_for(view.compact_len))

    def _embed_together(self, req_ids: list[str]) -> None:
        """The input rows of a step's new views in one embedding call, kept with the views. If
        that fails, each prefill embeds its own rows, so the request at fault is blamed."""
        if len(req_ids) < 2:
            return  # its prefill embeds them
        try:
            rows = self.engine.embed_prompts([self._to_embed(r, self._encoded[r], self.views.get(r)) for r in req_ids])
        except Exception:  # noqa: BLE001 - see the docstring
            return
        for req_id, embeds in zip(req_ids, rows):
            self.views.keep_rows(req_id, embeds)

    def _to_embed(self, req_id: str, item_embeds: list[torch.Tensor], view: DraftView) -> PromptToEmbed:
        """The request's prompt with its items' encodings, to embed at its view's kept rows."""
        prompt = self._prompts[req_id]
        return PromptToEmbed(torch.tensor(prompt.prompt_token_ids, dtype=torch.long), prompt.mm_features,
                             item_embeds, view.keep_rows)

    def _encode(self, mm_features: list, result: StepResult) -> list[torch.Tensor]:
        """The draft encoder's output for each item: recent ones reused, the others encoded
        together, each distinct item once (counted: once per video asked about is the aim)."""
        device = self.engine.device
        embeds = [self.recent_encodes.get(f.identifier, device) for f in mm_features]
        todo = {}  # identifier -> its first item still to encode
        for feature, found in zip(mm_features, embeds):
            if found is None:
                todo.setdefault(feature.identifier, feature)
        if not todo:
            return embeds
        fresh = dict(zip(todo, self.engine.embed_multimodal(list(todo.values()))))
        result.encodes += len(fresh)
        for identifier, encoded in fresh.items():
            self.recent_encodes.put(identifier, encoded)
        return [fresh[f.identifier] if found is None else found for f, found in zip(mm_features, embeds)]

    def _needs_encode(self, prefill: Prefill) -> bool:
        """A new request's prefill whose view is still to build from its items (not encoded yet)."""
        prompt, req_id = self._prompts.get(prefill.req_id), prefill.req_id
        return (prompt is not None and bool(prompt.mm_features) and req_id not in self._states
                and req_id not in self.views and req_id not in self._encoded
                and self.views.reusable(prompt, prefill.attention) is None)

    def _encode_together(self, requests: list[tuple[str, list]], result: StepResult) -> None:
        """Encode several requests' items in as few encoder calls as fit (kept in ``_encoded``
        for their prefills). If that fails, each request's are encoded alone; a request
        that still fails is left to its prefill, which encodes again and is blamed."""
        requests = [(req_id, items) for req_id, items in requests if req_id not in self.views
                    and req_id not in self._encoded]
        if len(requests) > 1 and self._encode_all(requests, result):
            return
        for req_id, items in requests:
            try:
                self._encoded[req_id] = self._encode(items, result)
            except Exception as exc:  # noqa: BLE001 - this request only; its prefill encodes again
                logger.warning("hippo: encoding the items of request %r failed (%s: %s); its prefill "
                               "encodes them again", req_id, type(exc).__name__, exc)

    def _encode_all(self, requests: list[tuple[str, list]], result: StepResult) -> bool:
        """All the requests' items in as few encoder calls as fit; False if that failed."""
        try:
            embeds = iter(self._encode([f for _, items in requests for f in items], result))
        except Exception:  # noqa: BLE001 - the caller encodes each request alone
            return False
        for req_id, items in requests:
            self._encoded[req_id] = [next(embeds) for _ in items]
        return True

    def _check_room(self, req_id: str, view: DraftView) -> None:
        if not self.engine.has_room_for(view.compact_len):
            raise DraftCapacityError(
                f"no room for the {view.compact_len}-token draft prompt of request {req_id!r} "
                f"in the draft KV cache ({self.engine.num_free_blocks} blocks free)"
            )


@dataclasses.dataclass(frozen=True)
class _PreparedPrefill:
    """A request's compact prompt, ready to run into the draft's KV cache."""

    req_id: str
    state: DraftState
    positions: torch.Tensor  # [3, Pc]
    embeds: torch.Tensor  # [Pc, row_width]


def _rows(prepared: _PreparedPrefill) -> int:
    return prepared.positions.shape[1]


def _report(req_id: str, view: DraftView) -> ViewReport:
    return ViewReport(
        req_id=req_id,
        keep_rows=view.keep_rows,
        prompt_len=view.prompt_len,
        video_tokens=view.video_tokens,
        video_tokens_seen=view.video_tokens_seen,
        pruning_seconds=view.pruning_seconds,
        attention_used=view.attention_used,
    )
