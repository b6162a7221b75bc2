"""A draft whose embeddings are padded to fewer rows than the target's, with the same tokenizer.

As Qwen2.5-VL-3B (151,936 rows) drafts for 7B/72B (152,064): the tiny target has 512
rows for 502 tokenizer ids, the draft here 508, and its padding rows outscore real
ones (hippo_testbed.padded_vocab). The engine starts, stays lossless, drafts, and
never proposes an id past the tokenizer's.
"""

from __future__ import annotations

import pytest

from engine_utils import counter, draft_worker_of, engine, generate_ids, hippo_config, proposer_of
from test_hippo_lossless import baseline, baselines, requests, tokenizer  # noqa: F401 - shared fixtures

pytestmark = pytest.mark.engine

DRAFT_ROWS = 508


@pytest.fixture(scope="module")
def padded_draft(tiny, tiny_tokenizer, tmp_path_factory):
    from hippo_testbed.padded_vocab import with_vocab_rows

    out = tmp_path_factory.mktemp("padded_vocab") / "draft"
    return with_vocab_rows(tiny.draft, DRAFT_ROWS, out, len(tiny_tokenizer))


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "vpsd"])
def test_a_draft_padded_to_fewer_rows_is_lossless_and_proposes_only_tokenizer_ids(
        parallel, padded_draft, tiny, tiny_tokenizer, requests, baseline):
    with engine(tiny.target, speculative_config=hippo_config(padded_draft, 3, parallel)) as llm:
        draft_engine = draft_worker_of(llm).engine
        assert (draft_engine.vocab_size, draft_engine.proposable_ids) == (DRAFT_ROWS, len(tiny_tokenizer))
        proposer, proposed = proposer_of(llm), []
        propose_batch = proposer.propose_batch

        def recording(*args):
            drafts = propose_batch(*args)
            proposed.extend(token for draft in drafts for token in draft)
            return drafts

        proposer.propose_batch = recording
        assert generate_ids(llm, requests, max_tokens=24) == baseline["single"]
        assert counter(llm, "vllm:spec_decode_num_draft_tokens") > 0 and proposed
    assert max(proposed) < len(tiny_tokenizer)
