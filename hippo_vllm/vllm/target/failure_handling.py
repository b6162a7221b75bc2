"""What the target's side does when drafting fails: a mixin of ``HippoProposer``.

``drafting_failures.DraftingFailures`` counts and logs failures and decides when
drafting stops for good; this mixin applies those verdicts to the proposer's state.
It reads the proposer's ``failures`` (that counter), ``disabled``, ``_failed`` and
``_failed_this_step`` (requests without drafting for good, and for this step),
``capture``, ``messages``, ``draft``, ``late`` and ``_pending``, and calls its
``release`` and ``_send``. Nothing here raises: the target's outputs never depend
on the draft, so a failure only costs speculation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

from hippo_vllm.logs import get_logger
from hippo_vllm.vllm.protocol import DraftFailure

logger = get_logger(__name__)


class FailureHandling:
    """The proposer's failure paths; see the module docstring."""

    def _request_failed(self, failure: DraftFailure) -> None:
        """Drafting failed for one request: it goes on without speculation."""
        self.failures.record(failure, [failure.req_id])
        self._failed.add(failure.req_id)
        with contextlib.suppress(Exception):
            self.release(failure.req_id, finished=False, keep_capture=self._captures_agree_over_ranks())

    def step_failed(self, where: str, exc: BaseException, req_ids: Iterable[str]) -> None:
        """An error no single request can be blamed for; never raises.

        Every request of the step loses drafting for this step: its draft state
        and round are released (rebuilt next step from the kept view, so the
        output only loses speculation). After ``MAX_FAILED_STEPS_IN_A_ROW`` steps
        with such a failure, drafting stops for the engine.
        """
        try:
            failure = DraftFailure.from_exception("", where, exc)
        except Exception:  # noqa: BLE001 - the last line of defence
            failure = DraftFailure("", where, type(exc).__qualname__, "", "")
        self._step_failed_with(failure, req_ids)

    def _step_failed_with(self, failure: DraftFailure, req_ids: Iterable[str]) -> None:
        try:
            req_ids = list(req_ids)
            self.failures.record(failure, req_ids)
            self._failed_this_step.update(req_ids)
            keep_capture = self._captures_agree_over_ranks()
            for req_id in req_ids:
                with contextlib.suppress(Exception):
                    self.release(req_id, finished=False, keep_capture=keep_capture)
            self.messages.resend_prompts(req_ids)  # the draft's side may have lost them
            if self.failures.step_failed():
                self.disable()
        except Exception:  # noqa: BLE001 - the last line of defence
            self.disable()

    def _captures_agree_over_ranks(self) -> bool:
        """Under tensor parallelism every rank must track the same requests, so a
        failure seen by one rank must not drop a capture (vLLM's finish and
        preemption, seen by all ranks, still do)."""
        return self.capture is not None and self.capture.sums_over_ranks

    def capture_failed(self, where: str, exc: BaseException, req_ids: Iterable[str]) -> None:
        """The attention capture failed inside the target's forward (it never raises there).

        The capture marked those requests' videos incomplete, so their views are
        built without s_attn; drafting itself goes on, and the captures are kept
        (under tensor parallelism every rank must go on tracking the same requests).
        """
        with contextlib.suppress(Exception):
            self.failures.record(DraftFailure.from_exception("", where, exc), req_ids)

    def disable(self) -> None:
        """Stop drafting for the engine: free every draft state; no more spec tokens."""
        if self.disabled:
            return
        self.disabled = True
        logger.error(
            "hippo: drafting failed in %d steps in a row; speculation is off for this engine "
            "from now on (outputs are unaffected)", self.failures.steps_in_a_row,
        )
        keep_capture = self._captures_agree_over_ranks()  # the other ranks still sum with this one
        with contextlib.suppress(Exception):
            for req_id in self.messages.held_requests():
                self.release(req_id, finished=True, keep_capture=keep_capture)
            if self.draft is not None:
                self._pending = None
                self.late.clear()
                self._send(None, [])  # the releases only; the draft's answer is not needed
        if self.capture is not None and not keep_capture:
            with contextlib.suppress(Exception):
                self.capture.end_step()
