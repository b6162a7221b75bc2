"""Round logic of video parallel speculative decoding (VPSD) in vLLM's step loop.

PEARL's pre-verify/post-verify, expressed per vLLM step (the schedule is
described in ``docs/architecture.md``, "Scheduling"). In every step the target verifies the request's
scheduled spec tokens ``S`` (``γ−1`` or ``0`` of them) and samples one token of
its own; concurrently the draft continues from ``committed + S``, assuming all of
``S`` will be accepted, and greedily drafts a chunk ``E`` of ``γ`` tokens. After
the step the request committed ``sampled`` = the accepted prefix of ``S`` plus
the target's own token ``b``. Then:

- ``S`` fully accepted and ``b == E[0]``: ``E[0]`` is thereby verified, ``E[1:]``
  become the next spec tokens, mode :attr:`Mode.OPTIMISTIC` (PEARL's post-verify:
  the target's extra position verifies the first token of the next chunk);
- otherwise: no spec tokens next step, the draft restarts from the corrected
  token, mode :attr:`Mode.CONSERVATIVE` (PEARL's pre-verify).

Comparing ``b`` with ``E[0]`` is speculative sampling with a one-hot draft:
``E[0]`` is accepted with probability ``p(E[0])``, and on rejection ``b`` is
distributed as ``p`` with ``E[0]`` excluded, so the output is exactly the
target's. Nothing is sampled here; the state machine only compares
tokens, and a rejected draft token can never equal the token committed in its
place (the residual distribution gives it zero mass), so the accepted prefix is
the common prefix of ``S`` and ``sampled``.

:class:`VpsdRequest` is the per-request state machine, :class:`RoundStats` its
counters (MAT, tokens per target forward, acceptance), :func:`simulate` a
reference driver over scripted greedy streams, :func:`autoregressive` its
baseline.
"""

from __future__ import annotations

import dataclasses
import enum
import numbers
from collections.abc import Callable, Sequence

from hippo_vllm.core.validation import check_positive_int

TokenFn = Callable[[tuple[int, ...]], int]
"""A greedy model: the next token id given the whole context (prompt + generated)."""

StopFn = Callable[[tuple[int, ...]], bool]
"""A stop condition over the generated tokens (e.g. a stop string), checked after each token."""


class Mode(enum.Enum):
    """Which PEARL phase a request is in for the coming step."""

    CONSERVATIVE = "conservative"  # pre-verify: no spec tokens, the target checks E[0] only
    OPTIMISTIC = "optimistic"  # post-verify: the target verifies the γ−1 pending tokens, then E[0]


@dataclasses.dataclass
class RoundStats:
    """Cumulative VPSD counters of one request or, summed with ``+``, of many.

    Per call of :meth:`VpsdRequest.on_step` (one target verification step):

    - ``target_forwards``: +1;
    - ``committed_tokens``: + ``len(sampled)``;
    - ``drafted_tokens``: draft tokens whose verdict the step reveals, i.e.
      ``min(len(S), len(sampled))`` (all of ``S`` unless a stop truncated
      ``sampled``, since verification stops at the stop) plus 1 when ``E[0]`` was
      compared with the target's own token;
    - ``accepted_tokens``: the accepted prefix of ``S``, plus 1 when ``E[0]``
      equalled the target's own token;
    - ``optimistic_rounds`` / ``conservative_rounds``: +1 to the mode the request
      was in during the step (a step after :meth:`VpsdRequest.restart` is optimistic).

    ``restarts``: calls of :meth:`VpsdRequest.restart`.

    MAT (PEARL's mean accepted tokens, nano-PEARL's +1 convention) is recorded as
    samples: ``mat_sum`` is their sum, ``mat_count`` their number. Per request a run
    counter ``r`` holds the draft tokens accepted since the last sample; it grows
    across consecutive steps, so a long optimistic streak is one long run.

    - At a rejection (a token of ``S`` rejected, or ``S`` fully accepted and the
      target's own token ≠ ``E[0]``) the sample ``r + 1`` is recorded, ``r``
      including the tokens of ``S`` accepted in that step and the 1 being the
      correction token (nano-PEARL ``cur_acc_tokens + 1``); then ``r = 0``.
    - At the finish, if ``r > 0``, the sample ``r`` is recorded: the last run ended
      without a rejection, so it has no correction token (nano-PEARL records
      ``cur_acc_tokens`` there). An empty last run is not recorded, unlike
      nano-PEARL, whose finish after a rejection appends a 0 that no run produced.

    So every sample is the number of tokens committed in one run (accepted draft
    tokens plus its correction), and ``mat_sum`` equals ``accepted_tokens`` plus
    the number of rejections. Tokens the target committed without any draft
    comparison (the first token after prefill, ``draft_chunk=None``) belong to no
    run; a request without any accepted or rejected draft token records nothing.
    Summed stats pool the runs of all requests: ``mat`` is the mean run length,
    not a mean of per-request means.
    """

    target_forwards: int = 0
    committed_tokens: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    optimistic_rounds: int = 0
    conservative_rounds: int = 0
    mat_sum: int = 0
    mat_count: int = 0
    restarts: int = 0

    def __add__(self, other: RoundStats) -> RoundStats:
        if not isinstance(other, RoundStats):
            return NotImplemented
        return RoundStats(
            **{f.name: getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)}
        )

    def __radd__(self, other: object) -> RoundStats:
        # Lets the builtin sum() start from its default 0.
        if other == 0:
            return self + RoundStats()
        return NotImplemented

    @property
    def mat(self) -> float:
        """Mean accepted tokens per run, ``mat_sum / mat_count`` (0.0 before any run ended)."""
        return self.mat_sum / self.mat_count if self.mat_count else 0.0

    @property
    def tokens_per_target_forward(self) -> float:
        """``committed_tokens / target_forwards`` (EAGLE-style τ; 0.0 before any step)."""
        return self.committed_tokens / self.target_forwards if self.target_forwards else 0.0

    @property
    def acceptance_rate(self) -> float:
        """``accepted_tokens / drafted_tokens`` (0.0 before any draft token was verified)."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    def as_dict(self) -> dict[str, float]:
        """The counters and the three ratios, e.g. for a benchmark's JSON."""
        values: dict[str, float] = dataclasses.asdict(self)
        values.update(
            mat=self.mat,
            tokens_per_target_forward=self.tokens_per_target_forward,
            acceptance_rate=self.acceptance_rate,
        )
        return values


def _check_tokens(name: str, tokens: object) -> list[int]:
    """Return ``tokens`` as a list of non-negative ints, or raise naming the argument."""
    if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Sequence):
        raise ValueError(f"{name} must be a sequence of token ids, got {type(tokens).__name__}: {tokens!r}")
    for token in tokens:
        if isinstance(token, bool) or not isinstance(token, numbers.Integral) or token < 0:
            raise ValueError(
                f"{name} must hold non-negative int token ids, got {token!r} in {list(tokens)!r}"
            )
    return [int(token) for token in tokens]


class VpsdRequest:
    """Per-request VPSD state: the mode, the spec tokens in flight and the counters.

    Create one when the request starts (CONSERVATIVE, no spec tokens) and call
    :meth:`on_step` after every target step of the request, the prefill step
    included. A preempted request that is resumed starts a new object, since its
    draft state is rebuilt from scratch.
    """

    def __init__(self, gamma: int) -> None:
        self.gamma = check_positive_int("gamma", gamma)
        self.mode = Mode.CONSERVATIVE
        self.stats = RoundStats()
        self.finished = False
        self._pending: list[int] = []  # the spec tokens returned by the last on_step
        self._run = 0  # accepted draft tokens since the last MAT sample

    def on_step(
        self,
        scheduled_spec: Sequence[int],
        sampled: Sequence[int],
        draft_chunk: Sequence[int] | None,
        finished: bool = False,
    ) -> list[int]:
        """Account for one target step and return the next step's spec tokens.

        Args:
            scheduled_spec: ``S``, the spec tokens the target verified this step:
                a prefix of what the previous call returned (the scheduler may
                schedule fewer, never others).
            sampled: the tokens committed this step, the accepted prefix of ``S``
                then the target's own token. With ``finished`` it may stop early,
                as the engine drops the tokens after a stop (EOS, stop token or
                string, ``max_tokens``).
            draft_chunk: ``E``, the ``γ`` tokens the draft produced this step from
                ``committed + S`` (fewer when the request is about to reach its
                length limit, so that no drafted token could be wasted);
                ``None`` when no draft ran (the prefill step):
                nothing is compared with the target's own token then, and the
                next step is conservative.
            finished: the request ended within this step.

        Returns:
            ``E[1:]`` (``γ−1`` tokens) when all of ``S`` was accepted and the
            target's own token equals ``E[0]``; otherwise ``[]``. Always ``[]``
            when ``finished``.
        """
        if self.finished:
            raise ValueError("on_step called after the request finished (finished=True was already passed)")
        spec = _check_tokens("scheduled_spec", scheduled_spec)
        committed = _check_tokens("sampled", sampled)
        chunk = None if draft_chunk is None else _check_tokens("draft_chunk", draft_chunk)
        if not isinstance(finished, bool):
            raise ValueError(f"finished must be a bool, got {finished!r}")
        self._check_step(spec, committed, chunk, finished)

        num_accepted = 0
        while num_accepted < min(len(spec), len(committed)) and committed[num_accepted] == spec[num_accepted]:
            num_accepted += 1
        # A truncated step may end before the target's own token; then neither a
        # rejection inside S nor the comparison with E[0] is visible.
        has_own_token = len(committed) == num_accepted + 1
        chunk_compared = chunk is not None and has_own_token and num_accepted == len(spec)
        chunk_accepted = chunk_compared and committed[-1] == chunk[0]
        rejected = (has_own_token and num_accepted < len(spec)) or (chunk_compared and not chunk_accepted)

        stats = self.stats
        stats.target_forwards += 1
        stats.committed_tokens += len(committed)
        stats.drafted_tokens += min(len(spec), len(committed)) + int(chunk_compared)
        stats.accepted_tokens += num_accepted + int(chunk_accepted)
        if self.mode is Mode.OPTIMISTIC:
            stats.optimistic_rounds += 1
        else:
            stats.conservative_rounds += 1

        self._run += num_accepted + int(chunk_accepted)
        if rejected:
            self._record_run(self._run + 1)
        if finished:
            if self._run > 0:
                self._record_run(self._run)
            self.finished = True
            self._pending = []
            return []
        if chunk_accepted:
            self.mode = Mode.OPTIMISTIC
            self._pending = chunk[1:]
        else:
            self.mode = Mode.CONSERVATIVE
            self._pending = []
        return list(self._pending)

    def restart(self, spec: Sequence[int]) -> list[int]:
        """After a step that left no spec tokens: the next step verifies ``spec`` instead.

        ``spec`` (1 to ``gamma``−1 tokens, what vLLM verifies per step in this
        schedule) was drafted from the committed tokens after the step, with the
        target waiting for it, as PEARL's pre-verify waits for the draft's first
        token; the next step then verifies ``spec`` and compares its own token with
        the first token of the chunk drafted meanwhile, as an optimistic step does.
        Returns ``spec``.
        """
        if self.finished:
            raise ValueError("restart called after the request finished")
        if self._pending:
            raise ValueError(f"restart needs a request without pending spec tokens, it has {self._pending!r}")
        tokens = _check_tokens("spec", spec)
        if not 1 <= len(tokens) <= self.gamma - 1:
            raise ValueError(f"restart spec must hold 1 to gamma-1={self.gamma - 1} tokens, got {tokens!r}")
        self.mode = Mode.OPTIMISTIC
        self.stats.restarts += 1
        self._pending = tokens
        return list(tokens)

    def _check_step(
        self, spec: list[int], committed: list[int], chunk: list[int] | None, finished: bool
    ) -> None:
        if len(spec) > len(self._pending) or spec != self._pending[: len(spec)]:
            raise ValueError(
                f"scheduled_spec must be a prefix of the spec tokens the previous on_step returned "
                f"({self._pending!r}), got {spec!r}"
            )
        if chunk is not None and not 1 <= len(chunk) <= self.gamma:
            raise ValueError(
                f"draft_chunk must hold 1 to gamma={self.gamma} tokens (or be None), got {chunk!r}"
            )
        if not committed:
            raise ValueError("sampled must hold at least one token (every step commits one), got []")
        if len(committed) > len(spec) + 1:
            raise ValueError(
                f"sampled holds {len(committed)} tokens, more than "
                f"len(scheduled_spec) + 1 = {len(spec) + 1}: sampled={committed!r}, scheduled_spec={spec!r}"
            )
        mismatch = next((i for i, (a, b) in enumerate(zip(committed, spec)) if a != b), None)
        if mismatch is not None and mismatch < len(committed) - 1:
            raise ValueError(
                f"sampled disagrees with scheduled_spec at position {mismatch} but continues after it: "
                f"the token there is the target's correction and must be the last; "
                f"sampled={committed!r}, scheduled_spec={spec!r}"
            )
        if mismatch is None and len(committed) <= len(spec) and not finished:
            raise ValueError(
                f"sampled={committed!r} ends inside scheduled_spec={spec!r} without the target's own token; "
                f"that only happens when a stop truncated the step, so pass finished=True"
            )

    def close(self) -> None:
        """End the request between steps: record its last run, as ``finished`` would.

        Engines that learn about a finish only after the step (vLLM reports
        finished requests with the next schedule) call this instead of passing
        ``finished=True``; calling it twice, or after ``finished``, is harmless.
        """
        if not self.finished and self._run > 0:
            self._record_run(self._run)
        self.finished = True
        self._pending = []

    def _record_run(self, length: int) -> None:
        self.stats.mat_sum += length
        self.stats.mat_count += 1
        self._run = 0


def _is_stop(generated: list[int], max_tokens: int, eos: int | None, stop_after: StopFn | None) -> bool:
    """Whether the request ends with its last generated token (vLLM's per-token stop check)."""
    return (
        len(generated) >= max_tokens
        or (eos is not None and generated[-1] == eos)
        or (stop_after is not None and bool(stop_after(tuple(generated))))
    )


def _check_driver_args(prompt: object, max_tokens: object, eos: object) -> tuple[list[int], int]:
    tokens = _check_tokens("prompt", prompt)
    limit = check_positive_int("max_tokens", max_tokens)
    if eos is not None and (isinstance(eos, bool) or not isinstance(eos, numbers.Integral) or eos < 0):
        raise ValueError(f"eos must be None or a non-negative int token id, got {eos!r}")
    return tokens, limit


def autoregressive(
    target_next: TokenFn,
    prompt: Sequence[int],
    max_tokens: int,
    eos: int | None = None,
    stop_after: StopFn | None = None,
) -> list[int]:
    """Target-only greedy decoding: the output VPSD must reproduce token for token.

    Generates until ``max_tokens`` tokens, a token equal to ``eos`` (kept), or
    ``stop_after(generated)`` is true (the token that made it true is kept).
    """
    context, limit = _check_driver_args(prompt, max_tokens, eos)
    generated: list[int] = []
    while True:
        generated.append(int(target_next(tuple(context + generated))))
        if _is_stop(generated, limit, eos, stop_after):
            return generated


def simulate(
    target_next: TokenFn,
    draft_next: TokenFn,
    prompt: Sequence[int],
    gamma: int,
    max_tokens: int,
    eos: int | None = None,
    stop_after: StopFn | None = None,
    restart: bool = False,
) -> tuple[list[int], RoundStats]:
    """Run VPSD step by step as the vLLM integration does, over greedy scripted models.

    Step 0 is the prefill: the target produces the first token, no draft runs
    (``draft_chunk=None``). Every later step:

    1. the target verifies ``S`` (the spec tokens from the previous step) one
       token at a time against its own greedy choice and appends its own token
       after the accepted prefix (a correction, or the bonus after a full accept);
    2. the draft drafts ``E`` (``gamma`` tokens) greedily from ``context + S``;
    3. the committed tokens are checked one by one for a stop (``eos`` — kept —,
       ``max_tokens``, ``stop_after(generated)`` true), and the rest of the step
       is dropped, as vLLM's output processing does;
    4. :meth:`VpsdRequest.on_step` gets ``S``, the kept tokens, ``E`` and whether
       the request finished, and returns the next ``S``;
    5. with ``restart``, a step after which ``S`` is empty (a rejection, not the
       prefill) gets ``S`` from :meth:`VpsdRequest.restart`: ``gamma``−1 tokens
       drafted greedily from the committed tokens (fewer near ``max_tokens``).

    Returns the generated tokens (the prompt excluded) and the request's stats.
    """
    context, limit = _check_driver_args(prompt, max_tokens, eos)
    request = VpsdRequest(gamma)
    generated: list[int] = []
    spec: list[int] = []
    first_step = True
    while True:
        prefix = context + generated
        sampled: list[int] = []
        for token in spec:
            own = int(target_next(tuple(prefix + sampled)))
            sampled.append(own)
            if own != token:
                break
        else:
            sampled.append(int(target_next(tuple(prefix + sampled))))

        chunk: list[int] | None = None
        if not first_step:
            chunk = []
            draft_context = prefix + spec
            for _ in range(request.gamma):
                chunk.append(int(draft_next(tuple(draft_context + chunk))))
        first_step = False

        kept: list[int] = []
        finished = False
        for token in sampled:
            kept.append(token)
            generated.append(token)
            if _is_stop(generated, limit, eos, stop_after):
                finished = True
                break
        spec = request.on_step(spec, kept, chunk, finished=finished)
        if finished:
            return generated, request.stats
        room = min(request.gamma - 1, limit - len(generated) - 1)
        if restart and not spec and chunk is not None and room > 0:
            drafted: list[int] = []
            for _ in range(room):
                drafted.append(int(draft_next(tuple(context + generated + drafted))))
            spec = request.restart(drafted)
