"""A hippo server answers top-k requests, request-level or server default, and stays up.

With speculation configured, vLLM runs top-k over the draft positions of every
step, also steps without draft tokens; unguarded, that crashed the engine (see
hippo_vllm/vllm/seam/empty_logits_guard.py). The server default comes the way real
checkpoints bring it: a ``generation_config.json`` with a ``top_k``, which vLLM
applies by default (``--generation-config auto``) to every request that does not
set ``top_k`` itself. The checkpoint is a copy of the tiny target (links to its
files) with such a file; the reference server without speculation uses the same
copy and flags. Both servers are shared with the other server tests
(shared_servers.py). The same server also shows that vLLM refuses ``min_p`` and
``logit_bias`` per request under speculation, without harm to other requests.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from server_process import metric_totals, read_metrics  # noqa: E402
from shared_servers import SERVED_NAME, SERVER_TOP_K  # noqa: E402

pytestmark = pytest.mark.engine

MAX_TOKENS = 16
REQUEST_TIMEOUT_S = 120

GREEDY = {"temperature": 0.0}
SERVER_DEFAULT = {}  # OpenAI's default temperature 1.0 and the checkpoint's top_k
REQUEST_TOP_K = {"temperature": 0.8, "top_k": 3}
TOP_1 = {"temperature": 0.8, "top_k": 1}  # only the argmax survives: must equal greedy


@pytest.fixture(scope="module")
def messages(tiny) -> list[list[dict]]:
    video = {"type": "video_url", "video_url": {"url": tiny.synthetic_videos[0].as_uri()}}
    return [
        [{"role": "user", "content": [video, {"type": "text", "text": "Describe this video."}]}],
        [{"role": "user", "content": "Which colours appear?"}],
    ]


def ask_all(server, requests: list[tuple[list[dict], dict]]) -> list:
    """All (messages, sampling) requests in flight at once; token ids or the exception, in order."""
    import openai

    async def ask(client, messages, sampling):
        extra = {"ignore_eos": True, "return_token_ids": True}
        extra.update({k: v for k, v in sampling.items() if k in ("top_k", "min_p")})
        kwargs = {k: v for k, v in sampling.items() if k in ("temperature", "logit_bias")}
        response = await client.chat.completions.create(
            model=SERVED_NAME, messages=messages, max_tokens=MAX_TOKENS, extra_body=extra, **kwargs)
        return tuple(response.choices[0].token_ids)

    async def send_all():
        async with openai.AsyncOpenAI(base_url=server.openai_base_url, api_key="unused",
                                      timeout=REQUEST_TIMEOUT_S, max_retries=0) as client:
            return await asyncio.gather(*(ask(client, m, s) for m, s in requests), return_exceptions=True)

    return asyncio.run(send_all())


@pytest.fixture(scope="module")
def reference(plain_server, messages) -> list[tuple[int, ...]]:
    """Greedy answers of the same checkpoint and flags without speculation."""
    answers = ask_all(plain_server, [(m, GREEDY) for m in messages])
    assert all(isinstance(a, tuple) for a in answers), answers
    return answers


def test_top_k_requests_complete_and_greedy_stays_lossless(hippo_server, messages, reference):
    kinds = (GREEDY, SERVER_DEFAULT, REQUEST_TOP_K, TOP_1)
    answers = ask_all(hippo_server, [(m, kind) for kind in kinds for m in messages])
    assert hippo_server.is_healthy(), hippo_server.log_tail()
    after = ask_all(hippo_server, [(m, GREEDY) for m in messages])
    totals = metric_totals(read_metrics(hippo_server.base_url))
    applied = f"generation_config.json`: `{{'top_k': {SERVER_TOP_K}}}`" in hippo_server.log_path.read_text()

    failed = [a for a in answers + after if not isinstance(a, tuple)]
    assert failed == [], failed
    greedy, server_default, request_top_k, top_1 = (answers[i:i + 2] for i in range(0, 8, 2))
    assert applied, "vLLM did not apply the checkpoint's top_k as the server default"
    assert totals["vllm:spec_decode_num_draft_tokens_total"] > 0
    assert [len(a) for a in server_default + request_top_k] == [MAX_TOKENS] * 4
    assert greedy == reference
    assert top_1 == reference
    assert after == reference


def test_min_p_and_logit_bias_are_refused_per_request(hippo_server, messages, reference):
    import openai

    refused = ask_all(hippo_server, [(messages[1], {"temperature": 0.8, "min_p": 0.1}),
                                     (messages[1], {"temperature": 0.8, "logit_bias": {"7": 5}}),
                                     (messages[1], GREEDY)])
    for error in refused[:2]:
        assert isinstance(error, openai.BadRequestError), error
        assert "not yet supported with speculative decoding" in str(error)
    assert refused[2] == reference[1]
