"""`vllm serve` with "method": "hippo" answers OpenAI clients exactly like the target alone.

Two real servers on the tiny fixtures, shared with the other server tests
(shared_servers.py): a plain one (same flags, no --speculative-config) answers the
reference requests, the hippo one every test of the module. All requests here are
greedy, so the checkpoint's default top_k does not change them.

Answers are compared by token ids (vLLM's `return_token_ids`), prompt and
output, not only by text: the tiny random models write byte soup that
detokenises lossily.
"""

from __future__ import annotations

import asyncio
import base64
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

# The server helpers are shared with the serving demo in examples/.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from server_process import ServerProcess, metric_totals, read_metrics  # noqa: E402
from shared_servers import K, SERVED_NAME  # noqa: E402

pytestmark = pytest.mark.engine

MAX_TOKENS = 24
REQUEST_TIMEOUT_S = 120
GOOD_CHATS = ("video_file_url", "video_base64_url", "text_only")


@dataclass(frozen=True)
class Answer:
    status: int
    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str


def video_chat(url: str, question: str = "Describe this video.") -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": url}},
        {"type": "text", "text": question},
    ]}]


def mp4_data_url(data: bytes) -> str:
    return "data:video/mp4;base64," + base64.b64encode(data).decode()


async def _ask(client, messages: list[dict]) -> Answer:
    raw = await client.chat.completions.with_raw_response.create(
        model=SERVED_NAME, messages=messages, max_tokens=MAX_TOKENS, temperature=0.0,
        # ignore_eos: every answer is MAX_TOKENS long, so every comparison spans
        # several draft/verify rounds; return_token_ids: compare ids, not text.
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    response = raw.parse()  # with_raw_response returns the parsed body synchronously
    choice = response.choices[0]
    return Answer(raw.status_code, tuple(response.prompt_token_ids), tuple(choice.token_ids),
                  choice.message.content, choice.finish_reason)


def ask_concurrently(server: ServerProcess, conversations: list[list[dict]]) -> list:
    """All requests in flight at once; each result is an Answer or the client's exception."""
    import openai

    async def send_all():
        async with openai.AsyncOpenAI(base_url=server.openai_base_url, api_key="unused",
                                      timeout=REQUEST_TIMEOUT_S, max_retries=0) as client:
            return await asyncio.gather(*(_ask(client, m) for m in conversations), return_exceptions=True)

    return asyncio.run(send_all())


def ask(server: ServerProcess, messages: list[dict]) -> Answer:
    (result,) = ask_concurrently(server, [messages])
    if isinstance(result, BaseException):
        raise result
    return result


@pytest.fixture(scope="module")
def chats(tiny) -> dict[str, list[dict]]:
    videos = tiny.synthetic_videos
    return {
        "video_file_url": video_chat(videos[0].as_uri()),  # inside --allowed-local-media-path
        "video_base64_url": video_chat(mp4_data_url(videos[1].read_bytes())),
        "text_only": [{"role": "user", "content": "Which colours appear?"}],
    }


@pytest.fixture(scope="module")
def undecodable_videos(tiny) -> dict[str, bytes]:
    """Three ways a video can be broken, each failing at a different decoding stage."""
    mp4 = tiny.synthetic_videos[0].read_bytes()
    # OpenCV writes the frame data box (mdat) first and the index box (moov) last.
    mdat_payload, moov_box = mp4.find(b"mdat") + 4, mp4.find(b"moov") - 4
    assert 0 < mdat_payload < moov_box, "unexpected mp4 layout"
    return {
        "random_bytes": random.Random(0).randbytes(4096),  # no container at all
        "truncated_mp4": mp4[: len(mp4) // 2],  # index lost: the container cannot be opened
        # The container opens and reports 16 frames, but none of them decodes.
        "frames_zeroed": mp4[:mdat_payload] + bytes(moov_box - mdat_payload) + mp4[moov_box:],
    }


@pytest.fixture(scope="module")
def reference(plain_server, chats) -> dict[str, Answer]:
    """The answers of a server with the same flags but no speculation: the target alone."""
    return {name: ask(plain_server, messages) for name, messages in chats.items()}


def drafted_tokens(server: ServerProcess) -> float:
    return metric_totals(read_metrics(server.base_url)).get("vllm:spec_decode_num_draft_tokens_total", 0.0)


def drafted_since(server: ServerProcess, before: float, timeout: float = 10.0) -> bool:
    """Whether drafted tokens grew past ``before``; the API server records a step's
    stats after it hands the outputs out, so the answer can arrive first."""
    deadline = time.monotonic() + timeout
    while drafted_tokens(server) <= before:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@pytest.mark.parametrize("chat", GOOD_CHATS)
def test_answers_are_token_identical_to_the_target_alone(hippo_server, reference, chats, tiny_tokenizer, chat):
    drafted_before = drafted_tokens(hippo_server)
    answer = ask(hippo_server, chats[chat])
    expected = reference[chat]
    assert drafted_since(hippo_server, drafted_before), "no token of the answer was drafted"
    assert answer.status == 200 and answer.text
    assert answer.finish_reason == "length" and len(answer.token_ids) == MAX_TOKENS
    assert answer.prompt_token_ids == expected.prompt_token_ids
    assert answer.token_ids == expected.token_ids
    assert answer.text == expected.text
    video_pad = tiny_tokenizer.convert_tokens_to_ids("<|video_pad|>")
    has_video = video_pad in answer.prompt_token_ids
    assert has_video == chat.startswith("video"), "the video did not reach the prompt"


@pytest.mark.parametrize("broken", ["random_bytes", "truncated_mp4", "frames_zeroed"])
def test_an_undecodable_video_fails_only_its_own_request(hippo_server, reference, chats,
                                                         undecodable_videos, broken):
    import openai

    # Good requests first, so they are in flight when the broken one is refused.
    conversations = [chats[name] for name in GOOD_CHATS]
    conversations.append(video_chat(mp4_data_url(undecodable_videos[broken])))
    *good, refused = ask_concurrently(hippo_server, conversations)

    assert isinstance(refused, openai.APIStatusError), f"broken video was answered: {refused}"
    assert 400 <= refused.status_code < 500, refused
    assert "video" in str(refused).lower(), refused
    for name, answer in zip(GOOD_CHATS, good):
        assert not isinstance(answer, BaseException), f"{name} failed next to the broken video: {answer}"
        assert answer.token_ids == reference[name].token_ids, name

    assert hippo_server.is_healthy()
    assert ask(hippo_server, chats["video_file_url"]).token_ids == reference["video_file_url"].token_ids


def test_metrics_count_drafted_and_accepted_tokens(hippo_server, chats):
    ask(hippo_server, chats["video_file_url"])  # at least one speculative request, whatever ran before
    totals = metric_totals(read_metrics(hippo_server.base_url))
    drafts = totals["vllm:spec_decode_num_drafts_total"]
    drafted = totals["vllm:spec_decode_num_draft_tokens_total"]
    accepted = totals["vllm:spec_decode_num_accepted_tokens_total"]
    assert drafts > 0 and 0 < drafted <= K * drafts
    # The fixture draft shares a bigram bias with the target, so greedy decoding
    # accepts some of its tokens (deterministically); all accepted is impossible
    # with a different random draft.
    assert 0 < accepted < drafted


@pytest.mark.parametrize("chat", ["video_file_url", "video_base64_url"])
def test_served_prompt_has_the_video_tokens_of_training(reference, tiny, chat):
    """The chat path decodes a clip into the frames training and the engine tests use.

    Expected: the clip decoded as training decodes it (`load_video` with the trained
    pair's frame count) and expanded by the checkpoint's own processor.
    """
    from transformers import AutoProcessor

    from hippo_testbed.trained_pair import NUM_FRAMES
    from hippo_testbed.trained_pair_inputs import hf_video_metadata
    from hippo_testbed.videos import load_video

    video = tiny.synthetic_videos[0 if chat == "video_file_url" else 1]
    processor = AutoProcessor.from_pretrained(str(tiny.target))
    frames, metadata = load_video(video, NUM_FRAMES)
    expanded = processor(text=["<|vision_start|><|video_pad|><|vision_end|>"], videos=[frames],
                         video_metadata=[hf_video_metadata(metadata)], return_tensors="pt")
    video_pad = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    trained_count = expanded["input_ids"][0].tolist().count(video_pad)
    assert len(frames) == NUM_FRAMES and trained_count > 0
    assert reference[chat].prompt_token_ids.count(video_pad) == trained_count
