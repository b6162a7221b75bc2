"""Drafting never takes the engine down: steps vLLM runs without the drafter, and
failures inside the draft, only cost speculation; the outputs stay the target's.

Real engines in-process on the tiny checkpoints, greedy, compared with the target
alone under the same settings. One hippo engine per schedule goes through every case,
in order: the steps vLLM runs without the drafter, then the faults, whose last one
switches drafting off for good.
"""

from __future__ import annotations

import logging
import time

import pytest

from engine_utils import counter, draft_worker_of, engine, generate_ids, proposer_of, text_request, video_request
from engine_utils import hippo_config as _hippo_config

from hippo_vllm.logs import ROOT_LOGGER_NAME

pytestmark = pytest.mark.engine

K = 3
SCHEDULES = pytest.mark.parametrize("parallel", [False, True], ids=["serial", "vpsd"])
NEAR_LIMIT = {"max_model_len": 320, "max_num_batched_tokens": 320}


def hippo_config(model, parallel):
    return _hippo_config(model, K, parallel)


def long_text_request(tokenizer, min_tokens: int = 200) -> dict:
    question = "Name the colours, the shapes and the motion you would expect in a short clip."
    while True:
        request = text_request(tokenizer, question)
        if len(tokenizer(request["prompt"]).input_ids) >= min_tokens:
            return request
        question += " Then name them again, in order."


@pytest.fixture(scope="module")
def near_limit_requests(tiny, tiny_tokenizer):
    """A ~200-token text prompt next to a video prompt, both asked for more than fits.

    Its video is one the fault requests do not show, so they find no recent view of it."""
    return [long_text_request(tiny_tokenizer),
            video_request(tiny_tokenizer, "Describe this video.", tiny.synthetic_videos[2])]


def check_steps_where_vllm_skips_the_drafter_are_survived(llm, near_limit_requests, near_limit_baseline):
    # Once the text request is within k tokens of max_model_len, vLLM runs the whole
    # batch's step without calling the drafter, while the video request goes on.
    assert generate_ids(llm, near_limit_requests, max_tokens=300) == near_limit_baseline
    assert counter(llm, "vllm:spec_decode_num_draft_tokens") > 0
    assert proposer_of(llm).stats.drafting_failures == 0


# -- faults injected into the draft, the capture and the step hooks ----------------------


@pytest.fixture(scope="module")
def fault_requests(tiny, tiny_tokenizer):
    videos = tiny.synthetic_videos
    return [video_request(tiny_tokenizer, "Describe this video.", videos[0]),
            video_request(tiny_tokenizer, "What moves in the video?", videos[1 % len(videos)]),
            text_request(tiny_tokenizer, "Which colours are warm?")]


@pytest.fixture(scope="module")
def baselines(tiny, near_limit_requests, fault_requests):
    """The target alone's answers to the near-limit and the fault requests, in one engine."""
    with engine(tiny.target, **NEAR_LIMIT) as llm:
        return (generate_ids(llm, near_limit_requests, max_tokens=300),
                generate_ids(llm, fault_requests, max_tokens=MAX_TOKENS))


MAX_TOKENS = 16


class DraftForwardFault:
    """The draft's forward raises for one request (the first it prefills) after its prefill."""

    def __init__(self, draft_engine):
        self.victim: str | None = None
        self.raised = 0
        self.others_after = 0  # forwards of other requests after the first failure
        original = draft_engine._forward_rows  # every forward of the draft, prefills and decode steps alike

        def forward(req_ids, *args, **kwargs):
            if self.victim is None:
                self.victim = req_ids[0]
            elif self.victim in req_ids:
                self.raised += 1
                raise RuntimeError("injected draft failure")
            elif self.raised:
                self.others_after += 1
            return original(req_ids, *args, **kwargs)

        draft_engine._forward_rows = forward


def wait_for_metric(llm, name: str, value: float, timeout: float = 5.0) -> None:
    """The worker's figures reach get_metrics() through a snapshot written every 0.5 s."""
    deadline = time.monotonic() + timeout
    while counter(llm, name) != value:
        assert time.monotonic() < deadline, f"{name} = {counter(llm, name)}, expected {value}"
        time.sleep(0.1)


def logged_traceback(record: logging.LogRecord, error: str) -> bool:
    """The record carries the failure's traceback (formatted where it happened), ending in ``error``."""
    message = record.getMessage()
    return "Traceback (most recent call last)" in message and error in message.splitlines()[-1]


class FailureLogs(logging.Handler):
    """The drafting-failure error records printed through vLLM's logger tree."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        if "drafting failed in" in record.getMessage():
            self.records.append(record)

    def __enter__(self):
        logging.getLogger(ROOT_LOGGER_NAME).addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger(ROOT_LOGGER_NAME).removeHandler(self)


def check_faults_in_drafting_cost_only_speculation(llm, fault_requests, fault_baseline):
    proposer = proposer_of(llm)
    stats = proposer.stats
    drafted = counter(llm, "vllm:spec_decode_num_draft_tokens")
    without_attention = stats.views_without_target_attention

    # The attention capture fails inside the target's forward, on every prefill
    # (these prompts are new to the engine, so no recent view stands in): the
    # forward goes on, the views are built without s_attn, drafting goes on.
    original_observe = proposer.capture._observe
    proposer.capture._observe = lambda *args: 1 / 0
    with FailureLogs() as logs:  # two batches: the same failure in two steps
        outputs = [ids for batch in (fault_requests[:1], fault_requests[1:])
                   for ids in generate_ids(llm, batch, max_tokens=MAX_TOKENS)]
    proposer.capture._observe = original_observe
    assert outputs == fault_baseline
    assert stats.drafting_failures >= 2  # at least one per video request
    assert stats.views_without_target_attention == without_attention + 2  # both videos
    assert counter(llm, "vllm:spec_decode_num_draft_tokens") > drafted
    assert len(logs.records) == 1  # one cause: logged once, with its traceback
    assert logged_traceback(logs.records[0], "ZeroDivisionError")
    assert not proposer.disabled

    # One request's draft forward fails: that request goes on without drafting.
    failures = stats.drafting_failures
    drafted = counter(llm, "vllm:spec_decode_num_draft_tokens")
    fault = DraftForwardFault(draft_worker_of(llm).engine)
    with FailureLogs() as logs:
        assert generate_ids(llm, fault_requests, max_tokens=MAX_TOKENS) == fault_baseline
    assert fault.raised >= 1 and fault.others_after > 0  # the others still drafted
    assert stats.drafting_failures == failures + 1
    assert counter(llm, "vllm:spec_decode_num_draft_tokens") > drafted
    wait_for_metric(llm, "vllm:hippo_drafting_failures", failures + 1)  # counters lose _total here
    assert len(logs.records) == 1 and logged_traceback(logs.records[0], "RuntimeError: injected draft failure")

    # A step hook that fails in every step: drafting is switched off for good.
    def broken_begin_step(*args):
        raise RuntimeError("injected step failure")

    proposer.begin_step = broken_begin_step
    assert generate_ids(llm, fault_requests, max_tokens=MAX_TOKENS) == fault_baseline
    assert proposer.disabled and proposer.num_draft_requests == 0


@SCHEDULES
def test_skipped_steps_and_faults_in_drafting_cost_only_speculation(parallel, tiny, near_limit_requests,
                                                                    fault_requests, baselines):
    near_limit_baseline, fault_baseline = baselines
    with engine(tiny.target, speculative_config=hippo_config(tiny.draft, parallel), **NEAR_LIMIT) as llm:
        check_steps_where_vllm_skips_the_drafter_are_survived(llm, near_limit_requests, near_limit_baseline)
        check_faults_in_drafting_cost_only_speculation(llm, fault_requests, fault_baseline)
