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
"""

from __future__ import annotations

from dataclasses import dataclass

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

    def reserve_bytes(self, available_bytes: int, target_bytes_per_token: float) -> int:
        """Bytes of ``available_bytes`` the draft cache takes; the target keeps the rest.

        For "auto" the target's token count T solves
        ``T * target_bytes_per_token + share * T * draft_bytes_per_token = available``.
        """
        if self.setting == "auto":
            target_tokens = available_bytes / (target_bytes_per_token + self.auto_share * self.draft_bytes_per_token)
        else:
            target_tokens = 0.0  # unused: an explicit count does not depend on the target
        reserved = self._blocks(self._tokens(target_tokens)) * self.block_size * self.draft_bytes_per_token
        if reserved >= available_bytes:
            raise ValueError(
                f'speculative_config["draft_kv_tokens"]={self.setting!r} needs '
                f"{reserved / 2**30:.3f} GiB for the draft's KV cache, but only "
                f"{available_bytes / 2**30:.3f} GiB are available for target and draft KV "
                f"caches together; lower draft_kv_tokens, or raise gpu_memory_utilization "
                f"or kv_cache_memory_bytes."
            )
        return reserved

    def num_blocks(self, target_tokens: int) -> int:
        """Draft cache blocks once the target's cache holds ``target_tokens`` tokens.

        Never more than ``reserve_bytes`` set aside: the target got at most T tokens.
        """
        return self._blocks(self._tokens(target_tokens))
