"""The CPU sampling fix: vLLM's defect exists, and our replacement is right."""

from __future__ import annotations

import pytest
import torch

from hippo_vllm.vllm.seam.cpu_sampling_fix import expand_batch_to_tokens

CU = torch.tensor([2, 5, 6], dtype=torch.int32)  # 2, 3 and 1 draft tokens


def test_expands_each_request_over_its_tokens_and_replaces_the_marker():
    temperatures = torch.tensor([0.7, -1.0, 0.2])
    out = expand_batch_to_tokens(temperatures, CU, 6, replace_from=-1, replace_to=1)
    assert out.tolist() == pytest.approx([0.7, 0.7, 1.0, 1.0, 1.0, 0.2])
    top_k = torch.tensor([5, 0, 3], dtype=torch.int32)
    assert expand_batch_to_tokens(top_k, CU, 6).tolist() == [5, 5, 0, 0, 0, 3]
    assert expand_batch_to_tokens(top_k, CU, 6).dtype == torch.int32


def test_requests_without_draft_tokens_contribute_nothing():
    out = expand_batch_to_tokens(torch.tensor([1.5, 2.5, 3.5]), torch.tensor([0, 2, 2]), 2)
    assert out.tolist() == [2.5, 2.5]


def test_vllm_cpu_expand_kernel_still_drops_float_results():
    """The upstream defect the fix exists for; when this fails, remove the patch."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("the defect is in the CPU kernel replacement")
    import vllm._custom_ops  # noqa: F401  (loads the CPU kernels)
    from vllm.utils.cpu_triton_utils import _expand_kernel_impl

    output = torch.full((6,), -7.0)
    _expand_kernel_impl(output, torch.tensor([0.7, 0.5, 0.2]), CU, -1, 1)
    assert output.tolist() == [-7.0] * 6  # nothing was written
