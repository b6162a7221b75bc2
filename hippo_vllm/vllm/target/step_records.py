"""vLLM's per-step state as plain records: the one place that reads the runner and the scheduler output.

The proposer, the VPSD rounds and the attention capture work on these records
only, so a change in vLLM's runner (``runner.requests``, ``runner.input_batch``)
or in its ``SchedulerOutput`` is met here. Three moments of a target step:

- :func:`step_start`, before the target's forward: which requests are new,
  resumed, finished or preempted, how many tokens each is scheduled and from
  where (the attention capture counts the prompt rows it must see);
- :func:`before_forward` (VPSD): for each request in decode, its committed
  outputs, the spec tokens the target is about to verify and the chunk budget;
- :func:`after_sampling`: for each request of the batch, in ``input_batch``
  order, what it sampled and the draft budget for the next step.

:func:`batch_rows` maps the flattened batch rows to requests at forward time,
and :func:`draft_prompt` builds what the draft's side needs of a prompt. The hippo
runner's few reads (the batch's requests, the target's KV cache geometry) are here
too: ``tests/vllm/test_layering.py`` fails on a read of vLLM's runner or scheduler
state anywhere else.

At ``step_start`` and ``before_forward`` the runner has not yet taken this step's
scheduler output in (it does inside ``execute_model``): a new request is not in
``runner.requests`` yet and a resumed one's state there is stale, so new and
resumed requests are read from the scheduler output or left out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Container
from typing import Any

from hippo_vllm.vllm.protocol import DraftPrompt
from hippo_vllm.vllm.model_families import ModelFamily


@dataclasses.dataclass(frozen=True)
class StartingPrompt:
    """A request whose prompt is (re)computed from this step on: new, or resumed after preemption."""

    req_id: str
    prompt_len: int | None  # None: no token ids (prompt embeddings)
    video_spans: list[tuple[int, int]]  # (offset, length) of each video's placeholder rows
    mm_ranges: list[tuple[int, int]]  # (offset, length) of every multimodal item's placeholder


def _starting_prompt(req_id: str, prompt_token_ids: Any, mm_features: Any) -> StartingPrompt:
    ranges = [(f.mm_position.offset, f.mm_position.length) for f in mm_features]
    videos = [r for r, f in zip(ranges, mm_features) if f.modality == "video"]
    return StartingPrompt(req_id, _len(prompt_token_ids), videos, ranges)


@dataclasses.dataclass(frozen=True)
class StepStart:
    finished: list[str]
    preempted: list[str]
    new: list[str]
    resumed: list[str]
    starting: list[StartingPrompt]  # the new and resumed requests' prompts
    arriving: list[tuple[str, list]]  # (req_id, mm_features with data): new multimodal requests to draft for
    num_scheduled_tokens: dict[str, int]
    computed_before: dict[str, int]  # scheduled request -> its tokens computed before this step


@dataclasses.dataclass(frozen=True)
class RequestRecord:
    """One request of the step."""

    req_id: str
    index: int  # row in input_batch (after sampling); -1 before the forward, when it is not final
    prompt_len: int
    outputs: list[int] | None  # committed output tokens (None where not asked for)
    spec: list[int]  # spec tokens the target verifies in this step
    max_tokens: int | None  # the request's sampling max_tokens
    # Before the forward (VPSD): the chunk's length, the tokens usable after this step
    # commits. After sampling: the tokens worth drafting for the next step.
    budget: int
    sampled: list[int] = dataclasses.field(default_factory=list)  # committed in this step (after sampling)


def serial_budget(k: int, max_model_len: int, num_tokens: int, num_outputs: int, max_tokens: int | None,
                  pad_to_k: bool = False) -> int:
    """Tokens worth drafting after sampling: beyond max_tokens or max_model_len they are discarded.

    ``num_tokens``/``num_outputs``: committed tokens (prompt and outputs) / outputs,
    this step's included. ``pad_to_k``: draft k tokens up to max_tokens too, so that
    the step verifies 1+k tokens like its neighbours (a FULL CUDA graph replays only
    steps whose every request does); vLLM drops what is accepted past max_tokens.
    Never past max_model_len, whose KV slots do not exist.
    """
    budget = min(k, max_model_len - num_tokens)
    if max_tokens is not None and not pad_to_k:
        # A step commits the accepted drafts plus one token of the target's own.
        budget = min(budget, max_tokens - num_outputs - 1)
    return budget


def chunk_budget(
    gamma: int, max_model_len: int, num_tokens: int, num_outputs: int, spec_len: int, max_tokens: int | None
) -> int:
    """VPSD chunk length before the forward: tokens still usable after this step commits.

    ``num_tokens``/``num_outputs``: committed before this step; the step commits
    at most the ``spec_len`` spec tokens plus one token of the target's own.
    """
    budget = min(gamma, max_model_len - (num_tokens + spec_len + 1))
    if max_tokens is not None:
        budget = min(budget, max_tokens - (num_outputs + spec_len + 1))
    return budget


def _max_tokens(state: Any) -> int | None:
    params = state.sampling_params
    return params.max_tokens if params is not None else None


def step_start(runner: Any, scheduler_output: Any) -> StepStart:
    cached = scheduler_output.scheduled_cached_reqs
    resumed = list(cached.resumed_req_ids)
    starting = [
        _starting_prompt(r.req_id, r.prompt_token_ids, r.mm_features) for r in scheduler_output.scheduled_new_reqs
    ]
    for req_id in resumed:  # still in runner.requests, with its prompt
        state = runner.requests.get(req_id)
        if state is not None:
            starting.append(_starting_prompt(req_id, state.prompt_token_ids, state.mm_features))
    computed = {r.req_id: r.num_computed_tokens for r in scheduler_output.scheduled_new_reqs}
    computed.update(zip(cached.req_ids, cached.num_computed_tokens))
    return StepStart(
        finished=list(scheduler_output.finished_req_ids),
        preempted=list(getattr(scheduler_output, "preempted_req_ids", None) or ()),
        new=[r.req_id for r in scheduler_output.scheduled_new_reqs],
        resumed=resumed,
        starting=starting,
        # Their data is there now: vLLM's worker fills it from its multimodal cache
        # before it hands the step to the runner.
        arriving=[(r.req_id, list(r.mm_features)) for r in scheduler_output.scheduled_new_reqs
                  if r.mm_features and _may_draft(getattr(r, "sampling_params", None))],
        num_scheduled_tokens=dict(scheduler_output.num_scheduled_tokens),
        computed_before=computed,
    )


def _may_draft(params: Any) -> bool:
    """Whether a request may ever be drafted for: not one that ends within two tokens
    (its first comes from the prefill, the next from a step with nothing to verify)."""
    max_tokens = getattr(params, "max_tokens", None)
    return max_tokens is None or max_tokens > 2


def _len(token_ids: Any) -> int | None:
    return len(token_ids) if token_ids is not None else None


def before_forward(runner: Any, scheduler_output: Any, gamma: int, max_model_len: int) -> list[RequestRecord]:
    """Scheduled requests known to the runner before this step (not new, not resumed)."""
    resumed = scheduler_output.scheduled_cached_reqs.resumed_req_ids
    spec_tokens = scheduler_output.scheduled_spec_decode_tokens
    records = []
    for req_id in scheduler_output.num_scheduled_tokens:
        state = runner.requests.get(req_id)
        if state is None or req_id in resumed:
            continue
        spec = list(spec_tokens.get(req_id, ()))
        outputs = list(state.output_token_ids)
        max_tokens = _max_tokens(state)
        records.append(RequestRecord(
            req_id=req_id,
            index=-1,
            prompt_len=state.num_prompt_tokens,
            outputs=outputs,
            spec=spec,
            max_tokens=max_tokens,
            budget=chunk_budget(gamma, max_model_len, state.num_tokens, len(outputs), len(spec), max_tokens),
        ))
    return records


def after_sampling(
    runner: Any, scheduler_output: Any, sampled_token_ids: list[list[int]], k: int, max_model_len: int,
    with_outputs: bool, pad_to_k: bool = False,
) -> list[RequestRecord]:
    """Every request of the batch in ``input_batch`` order; ``outputs`` only ``with_outputs``;
    ``pad_to_k``: see ``serial_budget``."""
    batch = runner.input_batch
    spec_tokens = scheduler_output.scheduled_spec_decode_tokens
    records = []
    for i, req_id in enumerate(batch.req_ids):
        state = runner.requests[req_id]
        num_tokens = int(batch.num_tokens_no_spec[i])
        prompt_len = state.num_prompt_tokens
        max_tokens = _max_tokens(state)
        outputs = batch.token_ids_cpu[i, prompt_len:num_tokens].tolist() if with_outputs else None
        records.append(RequestRecord(
            req_id=req_id,
            index=i,
            prompt_len=prompt_len,
            outputs=outputs,
            spec=list(spec_tokens.get(req_id, ())),
            max_tokens=max_tokens,
            budget=serial_budget(k, max_model_len, num_tokens, len(state.output_token_ids), max_tokens, pad_to_k),
            sampled=list(sampled_token_ids[i]),
        ))
    return records


def batch_rows(runner: Any, scheduler_output: Any, req_ids: Container[str]) -> dict[str, tuple[int, int, int, int]]:
    """``req_id -> (batch index, first batch row, tokens computed before this step, rows scheduled)``
    for ``req_ids``.

    Only right at forward time, after vLLM has (re)ordered its persistent batch:
    the flattened tokens and the attention metadata's block-table rows follow
    ``input_batch.req_ids``.
    """
    rows, row = {}, 0
    for index, req_id in enumerate(runner.input_batch.req_ids):
        n = scheduler_output.num_scheduled_tokens.get(req_id, 0)
        if req_id in req_ids:
            rows[req_id] = (index, row, runner.requests[req_id].num_computed_tokens, n)
        row += n
    return rows


def draft_prompt(runner: Any, req_id: str, family: ModelFamily) -> DraftPrompt:
    """The request's prompt for the draft's side: token ids, mm inputs with data, positions.

    Read after the target's prefill, when the runner's mm features carry their data.
    Tensors are copies, so a pickled prompt carries only its own rows. The positions
    are the target's, as its model ``family`` assigns them.
    """
    state = runner.requests[req_id]
    positions, delta = family.prompt_positions(
        len(state.prompt_token_ids), state.mrope_positions, state.mrope_position_delta
    )
    return DraftPrompt(
        req_id=req_id,
        prompt_token_ids=list(state.prompt_token_ids),
        mm_features=list(state.mm_features),
        positions=positions,
        mrope_delta=delta,
    )


def scheduled_req_ids(scheduler_output: Any) -> list[str]:
    """The requests scheduled in a step (those a step-wide failure costs their drafts)."""
    return list(scheduler_output.num_scheduled_tokens)


def no_drafts(runner: Any) -> list[list[int]]:
    """An empty proposal for every request of the batch, in ``input_batch`` order."""
    return [[] for _ in runner.input_batch.req_ids]


def target_kv_bytes_per_token(runner: Any) -> float:
    """KV bytes one token takes in the target's cache, over all its layer groups."""
    return sum(spec.page_size_bytes / spec.block_size for spec in runner.get_kv_cache_spec().values())


def target_kv_tokens(kv_cache_config: Any) -> int:
    """Tokens the target's KV cache holds, once vLLM has sized it."""
    spec = kv_cache_config.kv_cache_groups[0].kv_cache_spec
    return kv_cache_config.num_blocks * spec.block_size
