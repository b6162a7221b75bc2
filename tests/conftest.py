"""Session-wide test setup: vLLM engine environment and the tiny offline fixtures."""

import os

# Must happen before anything imports vLLM (it reads these at import/engine start).
# setdefault: a developer may still override them from the shell.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: 3 s init, not 17 s
# VLLM_CPU_KVCACHE_SPACE is deliberately not set: on CPU it overrides every engine's
# kv_cache_memory_bytes, and the preemption tests need a cache of a few blocks.
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no fork warnings from the fast tokenizer

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny():
    """Tiny target/draft/text-draft checkpoints and videos (`hippo_testbed.TinyFixtures`).

    Built once per recipe into the default cache ($HIPPO_VLLM_FIXTURES_DIR or
    ~/.cache/hippo_vllm/fixtures), so reruns reuse them.
    """
    from hippo_testbed import build_fixtures

    return build_fixtures()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny.target))


@pytest.fixture(scope="session")
def session_results():
    """A dict for results that tests of several modules compute alike (e.g. the target alone's
    outputs on one request set): computed by the first module that asks, reused by the others.
    A fixture defined in a test module and imported by another is a separate fixture there,
    so a module scope alone would compute them once per module."""
    return {}
