"""Top-k sampling survives steps without draft tokens, and stays lossless.

vLLM's own ``ngram`` method hits the same upstream defect; it is not started here
because it imports numba, after which every later engine start in the same
process fails in vLLM's Triton kernel dispatcher (``triton_utils/dispatcher.py``
reads ``vars()`` of a numba object that has no dict).
"""

from __future__ import annotations

import pytest
import torch
from engine_utils import counter, engine, generate_ids, greedy, hippo_config, text_request, video_request

from hippo_vllm.vllm.seam.empty_logits_guard import apply_top_k_top_p

MAX_TOKENS = 12


def test_zero_rows_come_back_unchanged():
    logits = torch.empty(0, 50)
    assert apply_top_k_top_p(logits, torch.empty(0, dtype=torch.int32), None) is logits


def test_other_logits_are_masked_by_vllm_exactly():
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p as vllm_apply

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    k = torch.tensor([1, 5, 50], dtype=torch.int32)
    p = torch.tensor([1.0, 0.5, 0.9])
    for kk, pp in ((k, None), (None, p), (k, p)):
        assert torch.equal(apply_top_k_top_p(logits.clone(), kk, pp), vllm_apply(logits.clone(), kk, pp))


def test_vllm_top_k_still_fails_on_empty_logits():
    """The upstream defect the guard exists for; when this fails, remove the guard."""
    from vllm.platforms import current_platform
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p as vllm_apply

    if not current_platform.is_cpu():
        pytest.skip("the Triton path of GPU builds returns early on zero rows")
    with pytest.raises(RuntimeError, match="numel\\(\\) == 0"):
        vllm_apply(torch.empty(0, 50), torch.empty(0, dtype=torch.int32), None)


def sampling(top_k: int):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.8, top_k=top_k, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.mark.engine
def test_top_k_requests_complete_and_top_1_equals_greedy(tiny, tiny_tokenizer):
    # top_k=1 at temperature 0.8 keeps only the argmax, so a lossless engine must
    # return exactly the greedy tokens of the engine without speculation.
    requests = [
        video_request(tiny_tokenizer, "What happens in the video?", tiny.synthetic_videos[0]),
        text_request(tiny_tokenizer, "Describe the moving objects and their colours."),
    ]
    with engine(tiny.target) as llm:
        expected = generate_ids(llm, requests, MAX_TOKENS)

    with engine(tiny.target, speculative_config=hippo_config(tiny.draft)) as llm:
        params = [greedy(MAX_TOKENS)] * 2 + [sampling(1)] * 2 + [sampling(5)] * 2
        outputs = llm.generate(requests * 3, params, use_tqdm=False)
        drafted = counter(llm, "vllm:spec_decode_num_draft_tokens")

    ids = [tuple(o.outputs[0].token_ids) for o in outputs]
    assert drafted > 0
    assert ids[0:2] == expected  # greedy
    assert ids[2:4] == expected  # top_k=1
    assert [len(i) for i in ids[4:6]] == [MAX_TOKENS] * 2  # top_k=5 completed
