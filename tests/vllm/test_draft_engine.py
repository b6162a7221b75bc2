"""DraftEngine against vLLM's own engine running the same draft checkpoint.

The reference is `LLM(model=draft)`: its runner's request state gives the exact
inputs vLLM used (prompt ids, multimodal features, M-RoPE positions and delta),
and its greedy output is what the DraftEngine must reproduce token for token
when it sees the full prompt. Pruned prompts have no engine reference, so they
are checked for self-consistency: one prefill vs chunked prefill vs batched
with another request, and truncate + re-run.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from engine_utils import greedy, make_llm, shutdown_llm, text_request, video_request
from vllm.multimodal.inputs import PlaceholderRange

from hippo_vllm.vllm.draft.engine import DraftCapacityError, DraftEngine, DraftInput
from hippo_vllm.vllm.draft.prompt_rows import PromptToEmbed

pytestmark = pytest.mark.engine

QUESTION = "Describe this video."
NUM_TOKENS = 16
BLOCK = 32


@dataclasses.dataclass
class Reference:
    """A request as vLLM's runner saw it, and vLLM's greedy output for it."""

    prompt_ids: torch.Tensor  # [N]
    mm_features: list
    positions: torch.Tensor  # [3, N]
    delta: int
    output: list[int]

    def decode_positions(self, k: int) -> torch.Tensor:
        """[3, 1] position of generated token k (0 = the token the prefill predicts)."""
        return torch.full((3, 1), len(self.prompt_ids) + k + self.delta, dtype=torch.int64)


def _capture_requests(llm, requests: list[dict]) -> list[Reference]:
    """Generate greedily and read each request's state inside the runner's step.

    The state is deleted when a request finishes, so it is copied right after
    `execute_model`; requests are matched by prompt ids because the runner's
    request ids carry a suffix the outputs do not.
    """
    runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
    seen: dict[str, tuple] = {}
    original = runner.execute_model

    def execute_model(*args, **kwargs):
        out = original(*args, **kwargs)
        for rid, state in runner.requests.items():
            seen.setdefault(
                rid,
                (list(state.prompt_token_ids), list(state.mm_features), state.mrope_positions.clone(),
                 int(state.mrope_position_delta)),
            )
        return out

    runner.execute_model = execute_model
    try:
        outputs = llm.generate(requests, greedy(NUM_TOKENS), use_tqdm=False)
    finally:
        runner.execute_model = original
    refs = []
    for out in outputs:
        ids, mm, pos, delta = next(s for s in seen.values() if s[0] == list(out.prompt_token_ids))
        refs.append(Reference(torch.tensor(ids), mm, pos, delta, list(out.outputs[0].token_ids)))
    return refs


def _requests(tiny, tokenizer) -> list[dict]:
    return [video_request(tokenizer, QUESTION, tiny.synthetic_videos[0]), text_request(tokenizer, QUESTION)]


@pytest.fixture(scope="module")
def draft_llm(tiny, tiny_tokenizer):
    """vLLM running the draft checkpoint, with its video and text references."""
    llm = make_llm(tiny.draft)
    try:
        video, text = _capture_requests(llm, _requests(tiny, tiny_tokenizer))
        yield llm, {"video": video, "text": text}
    finally:
        shutdown_llm(llm)


@pytest.fixture(scope="module")
def refs(draft_llm):
    return draft_llm[1]


@pytest.fixture(scope="module")
def engine(draft_llm, tiny):
    return DraftEngine(draft_llm[0].llm_engine.vllm_config, tiny.draft, num_blocks=64, block_size=BLOCK)


@pytest.fixture
def eng(engine):
    """The shared engine, empty for each test; requests a test leaves behind are freed and reported."""
    yield engine
    leaked = engine.kv.req_ids
    for rid in leaked:
        engine.free(rid)
    assert not leaked, f"the test left draft requests {leaked}"


def _full_prompt(eng: DraftEngine, ref: Reference):
    """([N, hidden] embeddings, [3, N] positions) of the whole prompt as vLLM ran it."""
    return eng.embed_prompt(ref.prompt_ids, ref.mm_features), ref.positions


def _pruned_prompt(eng: DraftEngine, ref: Reference, keep_every: int = 4):
    """All text rows plus every `keep_every`-th video row, at their original positions."""
    (feature,) = ref.mm_features
    start, length = feature.mm_position.offset, feature.mm_position.length
    keep = torch.ones(len(ref.prompt_ids), dtype=torch.bool)
    keep[start : start + length] = False
    keep[start : start + length : keep_every] = True
    return _full_prompt(eng, ref)[0][keep], ref.positions[:, keep]


def _token(rid: str, ref: Reference, k: int, token: int) -> DraftInput:
    """Generated token k as the next draft input."""
    return DraftInput(rid, ref.decode_positions(k), token_ids=torch.tensor([token]))


def _greedy_decode(eng, rid: str, ref: Reference, first_logits: torch.Tensor, steps: int):
    """Feed back argmax tokens one at a time; returns the `steps` tokens and the logits that chose them."""
    tokens, logits = [int(first_logits.argmax())], [first_logits]
    for k in range(1, steps):
        out = eng.run([_token(rid, ref, k - 1, tokens[-1])])[0]
        tokens.append(int(out.argmax()))
        logits.append(out)
    return tokens, logits


def test_full_prompts_reproduce_vllm_greedy_output_in_one_batch(eng, refs):
    video, text = refs["video"], refs["text"]
    assert video.delta != 0 and text.delta == 0  # the video really shifts the decode positions
    (emb_v, pos_v), (emb_t, pos_t) = _full_prompt(eng, video), _full_prompt(eng, text)
    logits = eng.run([DraftInput("v", pos_v, inputs_embeds=emb_v), DraftInput("t", pos_t, inputs_embeds=emb_t)])
    assert logits.shape == (2, eng.vocab_size) and logits.dtype == torch.float32
    tokens = {"v": [int(logits[0].argmax())], "t": [int(logits[1].argmax())]}
    for k in range(1, NUM_TOKENS):
        step = [_token(rid, ref, k - 1, tokens[rid][-1]) for rid, ref in (("v", video), ("t", text))]
        for rid, row in zip(("v", "t"), eng.run(step)):
            tokens[rid].append(int(row.argmax()))
    assert tokens["v"] == video.output
    assert tokens["t"] == text.output
    assert eng.length("v") == len(video.prompt_ids) + NUM_TOKENS - 1
    assert eng.num_used_blocks == math.ceil(eng.length("v") / BLOCK) + math.ceil(eng.length("t") / BLOCK)
    eng.free("v")
    eng.free("t")


def test_video_prompt_alone_reproduces_vllm_greedy_output(eng, refs):
    video = refs["video"]
    emb, pos = _full_prompt(eng, video)
    first = eng.run([DraftInput("v", pos, inputs_embeds=emb)])[0]
    assert _greedy_decode(eng, "v", video, first, NUM_TOKENS)[0] == video.output
    eng.free("v")


def test_embed_prompt_places_the_drafts_own_video_embeddings(eng, refs):
    video = refs["video"]
    (item,) = eng.embed_multimodal(video.mm_features)
    pos = video.mm_features[0].mm_position
    assert item.shape == (pos.length, eng.hidden_size)
    emb = eng.embed_prompt(video.prompt_ids, video.mm_features, item_embeds=[item])
    assert emb.shape == (len(video.prompt_ids), eng.hidden_size)
    torch.testing.assert_close(emb[pos.offset : pos.offset + pos.length], item, rtol=0, atol=0)
    text_rows = torch.cat([video.prompt_ids[: pos.offset], video.prompt_ids[pos.offset + pos.length :]])
    text_emb = torch.cat([emb[: pos.offset], emb[pos.offset + pos.length :]])
    torch.testing.assert_close(text_emb, eng.model.embed_input_ids(text_rows), rtol=0, atol=0)

    # With an is_embed mask only the marked placeholder rows take item embeddings.
    is_embed = torch.arange(pos.length) % 2 == 0
    masked = dataclasses.replace(
        video.mm_features[0], mm_position=PlaceholderRange(pos.offset, pos.length, is_embed=is_embed)
    )
    emb = eng.embed_prompt(video.prompt_ids, [masked], item_embeds=[item[: pos.length // 2]])
    rows = torch.arange(pos.offset, pos.offset + pos.length)
    torch.testing.assert_close(emb[rows[is_embed]], item[: pos.length // 2], rtol=0, atol=0)
    token_rows = eng.model.embed_input_ids(video.prompt_ids[rows[~is_embed]])
    torch.testing.assert_close(emb[rows[~is_embed]], token_rows, rtol=0, atol=0)
    with pytest.raises(ValueError, match="64 embeddings for 32 placeholder rows"):
        eng.embed_prompt(video.prompt_ids, [masked], item_embeds=[item])


def test_embed_prompts_gives_each_prompt_exactly_its_rows_alone_in_one_call(eng, refs, monkeypatch):
    video, text = refs["video"], refs["text"]
    (item,) = eng.embed_multimodal(video.mm_features)
    pos = video.mm_features[0].mm_position
    kept = torch.cat([torch.arange(pos.offset), torch.arange(pos.offset, pos.offset + pos.length, 5),
                      torch.arange(pos.offset + pos.length, len(video.prompt_ids))])
    prompts = [PromptToEmbed(video.prompt_ids, video.mm_features, [item], kept),
               PromptToEmbed(text.prompt_ids, [], []),
               PromptToEmbed(video.prompt_ids, video.mm_features, [item]),
               PromptToEmbed(text.prompt_ids, [], [], torch.arange(0, len(text.prompt_ids), 2))]
    alone = [eng.embed_prompt(p.token_ids, p.mm_features, p.item_embeds, rows=p.rows) for p in prompts]
    calls, embed = [], eng.model.embed_input_ids
    monkeypatch.setattr(eng.model, "embed_input_ids", lambda *a, **k: calls.append(1) or embed(*a, **k))
    together = eng.embed_prompts(prompts)
    assert len(calls) == 1 and len(together) == len(prompts)
    for rows, expected in zip(together, alone):
        torch.testing.assert_close(rows, expected, rtol=0, atol=0)
    # Each prompt's rows have storage of their own (kept rows must not hold the others').
    assert len({rows.untyped_storage().data_ptr() for rows in together}) == len(prompts)
    with pytest.raises(ValueError, match="2 item embeddings for 1 multimodal items"):
        eng.embed_prompts([prompts[1], PromptToEmbed(video.prompt_ids, video.mm_features, [item, item])])


def test_pruned_prompt_is_consistent_across_chunking_and_batching(eng, refs):
    video, text = refs["video"], refs["text"]
    emb, pos = _pruned_prompt(eng, video)
    assert emb.shape[0] == len(video.prompt_ids) - 48  # 16 of 64 video rows kept

    whole = eng.run([DraftInput("whole", pos, inputs_embeds=emb)])[0]
    eng.run([DraftInput("chunked", pos[:, :20], inputs_embeds=emb[:20])])
    chunked = eng.run([DraftInput("chunked", pos[:, 20:], inputs_embeds=emb[20:])])[0]
    emb_t, pos_t = _full_prompt(eng, text)
    batched = eng.run([DraftInput("other", pos_t, inputs_embeds=emb_t), DraftInput("batched", pos, inputs_embeds=emb)])[1]
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-4)
    torch.testing.assert_close(batched, whole, rtol=0, atol=1e-4)

    # The pruned view changes the prediction (the draft does attend to video rows) ...
    full = eng.run([DraftInput("full", video.positions, inputs_embeds=_full_prompt(eng, video)[0])])[0]
    assert (full - whole).abs().max() > 1e-3
    # ... and decoding continues identically from the chunked prefill.
    tokens_w, logits_w = _greedy_decode(eng, "whole", video, whole, 5)
    tokens_c, logits_c = _greedy_decode(eng, "chunked", video, chunked, 5)
    assert tokens_w == tokens_c
    torch.testing.assert_close(torch.stack(logits_c), torch.stack(logits_w), rtol=0, atol=1e-4)
    for rid in ("whole", "chunked", "other", "batched", "full"):
        eng.free(rid)


def test_short_queries_go_first_for_backends_that_split_batches(eng, refs, monkeypatch):
    """CPU_ATTN takes any order; FLASHINFER-like builders (a reorder threshold) need decodes first."""
    video, text = refs["video"], refs["text"]
    emb_p, pos_p = _pruned_prompt(eng, video)
    emb_t, pos_t = _full_prompt(eng, text)
    alone_prefill = eng.run([DraftInput("p0", pos_p, inputs_embeds=emb_p)])[0]
    token = int(eng.run([DraftInput("t0", pos_t, inputs_embeds=emb_t)])[0].argmax())
    alone_decode = eng.run([_token("t0", text, 0, token)])[0]
    eng.run([DraftInput("t1", pos_t, inputs_embeds=emb_t)])

    builder, seen = eng.kv.builder, []
    build = builder.build

    def recording_build(**kwargs):
        seen.append(kwargs["common_attn_metadata"].query_start_loc_cpu.tolist())
        return build(**kwargs)

    monkeypatch.setattr(builder, "reorder_batch_threshold", 1)
    monkeypatch.setattr(builder, "build", recording_build)
    out = eng.run([DraftInput("p1", pos_p, inputs_embeds=emb_p), _token("t1", text, 0, token)])
    assert seen == [[0, 1, 1 + emb_p.shape[0]]]
    torch.testing.assert_close(out[0], alone_prefill, rtol=0, atol=1e-4)
    torch.testing.assert_close(out[1], alone_decode, rtol=0, atol=1e-4)
    for rid in ("p0", "t0", "p1", "t1"):
        eng.free(rid)


def test_truncate_and_rerun_reproduce_logits_and_free_returns_blocks(eng, refs):
    video = refs["video"]
    emb, pos = _pruned_prompt(eng, video)
    n = emb.shape[0]  # 58 rows: two blocks, the second one partly filled
    first = eng.run([DraftInput("r", pos, inputs_embeds=emb)])[0]
    tokens, logits = _greedy_decode(eng, "r", video, first, 10)  # length n + 9 = 67: three blocks
    assert eng.length("r") == n + 9 and eng.num_used_blocks == 3

    eng.truncate("r", n + 2)  # back into the second block: the third is freed
    assert eng.length("r") == n + 2 and eng.num_used_blocks == 2
    for k in range(3, 10):
        out = eng.run([_token("r", video, k - 1, tokens[k - 1])])[0]
        torch.testing.assert_close(out, logits[k], rtol=0, atol=1e-5)

    eng.truncate("r", 10)  # back into the prompt; re-running its rest reproduces the first prefill
    again = eng.run([DraftInput("r", pos[:, 10:], inputs_embeds=emb[10:])])[0]
    torch.testing.assert_close(again, first, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="cannot truncate"):
        eng.truncate("r", n + 1)

    eng.free("r")
    eng.free("r")  # unknown: no-op
    assert eng.num_requests == 0 and eng.num_free_blocks == 64 and eng.length("r") == 0


def test_capacity_error_leaves_the_engine_unchanged(draft_llm, tiny, refs, engine):
    video, text = refs["video"], refs["text"]
    n_t, n_v = len(text.prompt_ids), len(video.prompt_ids)  # 40 and 106 rows
    blocks_t = math.ceil(n_t / BLOCK)
    need = math.ceil(n_v / BLOCK) + math.ceil((n_t + 1) / BLOCK) - blocks_t
    small = DraftEngine(draft_llm[0].llm_engine.vllm_config, tiny.draft, num_blocks=4, block_size=BLOCK)
    emb_t, pos_t = _full_prompt(small, text)
    first = small.run([DraftInput("t", pos_t, inputs_embeds=emb_t)])[0]
    emb_v, pos_v = _full_prompt(small, video)
    token = int(first.argmax())
    assert need > 4 - blocks_t
    with pytest.raises(DraftCapacityError, match=f"needs {need} more blocks of 32 tokens but only {4 - blocks_t} of 4"):
        small.run([_token("t", text, 0, token), DraftInput("v", pos_v, inputs_embeds=emb_v)])
    assert (small.num_requests, small.num_used_blocks, small.length("t"), small.length("v")) == (1, blocks_t, n_t, 0)

    # The failed call wrote nothing: the text request continues as in the big engine.
    step = small.run([_token("t", text, 0, token)])[0]
    engine.run([DraftInput("t", pos_t, inputs_embeds=emb_t)])
    expected = engine.run([_token("t", text, 0, token)])[0]
    engine.free("t")
    torch.testing.assert_close(step, expected, rtol=0, atol=1e-5)


def test_bad_inputs_are_refused_without_changing_state(eng, refs):
    text = refs["text"]
    ids = text.prompt_ids[:4]
    with pytest.raises(ValueError, match="exactly one of token_ids and inputs_embeds"):
        DraftInput("x", text.positions[:, :4])
    with pytest.raises(ValueError, match="exactly one of token_ids and inputs_embeds"):
        DraftInput("x", text.positions[:, :4], token_ids=ids, inputs_embeds=torch.zeros(4, eng.hidden_size))
    with pytest.raises(ValueError, match=r"positions must be \[3, 4\]"):
        DraftInput("x", text.positions[0, :4], token_ids=ids)
    with pytest.raises(ValueError, match="one input per request"):
        eng.run([DraftInput("x", text.positions[:, :4], token_ids=ids)] * 2)
    with pytest.raises(ValueError, match="inputs_embeds width 7"):
        eng.run([DraftInput("x", text.positions[:, :4], inputs_embeds=torch.zeros(4, 7))])
    assert eng.num_requests == 0 and eng.num_free_blocks == 64


def test_target_engine_is_untouched_by_the_draft(draft_llm, tiny_tokenizer, tiny, refs, engine):
    llm, _ = draft_llm
    target_ctx = llm.llm_engine.vllm_config.compilation_config.static_forward_context
    draft_ctx = engine.draft_vllm_config.compilation_config.static_forward_context
    assert set(target_ctx) == set(draft_ctx) and all(target_ctx[n] is not draft_ctx[n] for n in target_ctx)
    assert engine.draft_vllm_config.cache_config is not llm.llm_engine.vllm_config.cache_config
    again = llm.generate(_requests(tiny, tiny_tokenizer), greedy(NUM_TOKENS), use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in again] == [refs["video"].output, refs["text"].output]


def test_bfloat16_draft_loads_and_runs(draft_llm, tiny, refs):
    video = refs["video"]
    bf16 = DraftEngine(
        draft_llm[0].llm_engine.vllm_config, tiny.draft, num_blocks=8, block_size=BLOCK, dtype=torch.bfloat16
    )
    assert bf16.dtype == torch.bfloat16
    assert all(t.dtype == torch.bfloat16 for t in bf16.kv.kv_caches.values())
    emb, pos = _pruned_prompt(bf16, video)
    assert emb.dtype == torch.bfloat16
    first = bf16.run([DraftInput("v", pos, inputs_embeds=emb)])[0]
    tokens, logits = _greedy_decode(bf16, "v", video, first, 4)
    assert len(tokens) == 4
    assert all(row.dtype == torch.float32 and torch.isfinite(row).all() for row in logits)
    bf16.free("v")
    assert bf16.num_free_blocks == 8


def test_block_size_must_be_a_kernel_block_size_of_the_backend(draft_llm, tiny):
    with pytest.raises(ValueError, match="block_size 16 is not a kernel block size of CPU_ATTN"):
        DraftEngine(draft_llm[0].llm_engine.vllm_config, tiny.draft, num_blocks=8, block_size=16)
