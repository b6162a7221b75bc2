"""How many tokens the draft's private KV cache holds, inside vLLM's memory budget.

The draft cache lives outside vLLM's KV pool, so the hippo worker sets its bytes
aside from the memory vLLM found for KV caches before vLLM sizes the target's
cache (``reserve_bytes``), and the runner allocates it once the target's cache
exists (``num_blocks``). Target plus draft then stay within
``gpu_memory_utilization`` (or an explicit ``kv_cache_memory_bytes``).

``draft_kv_tokens`` is either a token count or ``"auto"``: the draft holds
compact prompts, whose video is pruned to ``keep_ratio`` (text and outputs are
not), so "auto" gives it room for ``max(keep_ratio, AUTO_MIN_SHARE)`` of the
tokens the target's cache holds, never more than every running request at full
length can use. When it runs out, drafting pauses for the requests that do not
fit; outputs do not change.

In the target's process the draft's activations (a video item's encode, a prefill
piece) also live on the target's device, outside vLLM's profile: the worker
measures them once with a dummy encode and prefill and sets them aside too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hippo_vllm.logs import get_logger

logger = get_logger(__name__)

AUTO_MIN_SHARE = 0.25  # text-heavy prompts keep far more than keep_ratio of their tokens


@dataclass(frozen=True)
class DraftKVBudget:
    setting: int | str  # draft_kv_tokens: a token count or "auto"
    keep_ratio: float
    max_useful_tokens: int  # max_num_seqs x (max_model_len + k + 1)
    draft_bytes_per_token: int
    block_size: int

    @property
    def auto_share(self) -> float:
        return max(self.keep_ratio, AUTO_MIN_SHARE)

    def _blocks(self, tokens: float) -> int:
        return max(1, int(tokens) // self.block_size)

    def _tokens(self, target_tokens: float) -> float:
        if self.setting == "auto":
            return min(self.auto_share * target_tokens, self.max_useful_tokens)
        return self.setting

    def reserve_bytes(self, available_bytes: int, target_bytes_per_token: float, headroom_bytes: int = 0) -> int:
        """Bytes of ``available_bytes`` the draft takes; the target's KV cache keeps the rest.

        ``headroom_bytes``: the draft's measured activation peak (one encode of vLLM's
        profiling batch and one prefill piece), which vLLM's profile run did not see;
        it comes off first. For "auto" the target's token count T then solves
        ``T * target_bytes_per_token + share * T * draft_bytes_per_token = available - headroom``.
        """
        kv_bytes = available_bytes - headroom_bytes
        if kv_bytes <= 0:
            raise ValueError(
                f"the draft's measured working memory ({headroom_bytes / 2**30:.3f} GiB: one video item's "
                f"encode and one prefill piece) leaves nothing of the {available_bytes / 2**30:.3f} GiB "
                f"available for KV caches; raise gpu_memory_utilization or kv_cache_memory_bytes, or lower "
                f"max_num_batched_tokens (the draft's prefill piece)."
            )
        if self.setting == "auto":
            target_tokens = kv_bytes / (target_bytes_per_token + self.auto_share * self.draft_bytes_per_token)
        else:
            target_tokens = 0.0  # unused: an explicit count does not depend on the target
        reserved = self._blocks(self._tokens(target_tokens)) * self.block_size * self.draft_bytes_per_token
        if reserved >= kv_bytes:
            raise ValueError(
                f'speculative_config["draft_kv_tokens"]={self.setting!r} needs '
                f"{reserved / 2**30:.3f} GiB for the draft's KV cache, but only "
                f"{kv_bytes / 2**30:.3f} GiB are available for target and draft KV "
                f"caches together (after {headroom_bytes / 2**30:.3f} GiB of the draft's measured working "
                f"memory); lower draft_kv_tokens, or raise gpu_memory_utilization or kv_cache_memory_bytes."
            )
        return reserved + headroom_bytes

    def num_blocks(self, target_tokens: int) -> int:
        """Draft cache blocks once the target's cache holds ``target_tokens`` tokens.

        Never more than ``reserve_bytes`` set aside: the target got at most T tokens.
        """
        return self._blocks(self._tokens(target_tokens))

    def reserve_for(self, draft: Any, available_bytes: int, target_bytes_per_token: float,
                    mm_batch: dict[str, Any] | None = None) -> int:
        """What ``draft`` (a ``DraftBackend``) takes of vLLM's KV memory: its KV cache and
        its measured working memory (``mm_batch``: the dummy items to encode at once, see
        ``DraftEngine.measure_headroom``). 0 for a draft in a worker of its own: its
        cache is in that worker's memory, on its device."""
        if not draft.shares_target_memory:
            return 0
        headroom = draft.measure_headroom(mm_batch)
        reserved = self.reserve_bytes(available_bytes, target_bytes_per_token, headroom)
        logger.info("hippo: %.3f GiB of the KV memory set aside for the draft (%.3f GiB measured working "
                    "memory: one encode of the profiling batch and one prefill piece)",
                    reserved / 2**30, headroom / 2**30)
        return reserved

    def allocate_for(self, draft: Any, target_tokens: int) -> None:
        """Allocate ``draft``'s KV cache once the target's holds ``target_tokens`` tokens."""
        wanted = self.num_blocks(target_tokens)
        num_blocks = draft.allocate_kv_cache(wanted)
        tokens = num_blocks * draft.block_size
        logger.info(
            "hippo: draft KV cache of %d tokens (%.3f GiB, draft_kv_tokens=%s) next to the "
            "target's %d tokens%s",
            tokens, tokens * draft.kv_bytes_per_token / 2**30, self.setting, target_tokens,
            "" if num_blocks == wanted else
            f"; capped from {wanted * draft.block_size} by the memory free on the draft's device",
        )
