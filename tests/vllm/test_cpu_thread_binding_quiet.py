"""Requests through an in-process CPU engine do not repeat vLLM's thread-binding warning."""

from __future__ import annotations

import contextlib
import logging

import pytest

pytestmark = pytest.mark.engine

WARNING = "doesn't allow to use `torch.set_num_threads` after the thread binding"


class Recorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def recorded_binding_warnings():
    """The thread-binding warnings vLLM's CPU worker logs inside the block.

    Entered after the engine started: vLLM's logging set-up (dictConfig) removes the
    handlers of its loggers' children.
    """
    recorder = Recorder()
    logger = logging.getLogger("vllm.v1.worker.cpu_worker")
    logger.addHandler(recorder)
    try:
        yield recorder.messages
    finally:
        logger.removeHandler(recorder)


def test_requests_do_not_repeat_the_thread_binding_warning(tiny, tiny_tokenizer):
    from engine_utils import engine, generate_ids, hippo_config, video_request
    from vllm.renderers import base

    from hippo_vllm.vllm.seam.cpu_thread_binding_quiet import threads_bound_by_cpu_worker

    requests = [video_request(tiny_tokenizer, question, tiny.synthetic_videos[i])
                for i, question in enumerate(("Describe this video.", "What moves in the video?"))]
    with engine(tiny.target, speculative_config=hippo_config(tiny.draft)) as llm:
        assert threads_bound_by_cpu_worker(), "the worker did not bind threads in this process"
        with recorded_binding_warnings() as during_requests:
            for request in requests:
                generate_ids(llm, [request], max_tokens=2)
        assert [m for m in during_requests if WARNING in m] == []
        # The defect the patch covers: vLLM's own context, under the binding's stand-in,
        # logs the warning on entering and on leaving (per request, in the renderer).
        with recorded_binding_warnings() as unpatched:
            with base.set_default_torch_num_threads.__wrapped_original__():
                pass
        assert len([m for m in unpatched if WARNING in m]) == 2
