"""Turn ``"method": "hippo"`` into a configuration vLLM accepts.

vLLM's ``SpeculativeConfig`` knows a closed list of methods and forbids unknown
keys, so a hippo config cannot reach it as is. Before vLLM builds its config,
:func:`rewrite_hippo_engine_args` validates the user's keys (``HippoConfig``) and
rewrites the engine arguments to:

- ``speculative_config = {"method": "custom_class", "model": <HippoProposer path>,
  "num_speculative_tokens": K}``: vLLM's official seam for an external proposer.
  It gives hippo vLLM's scheduling of spec tokens, rejection sampler (lossless for
  greedy and sampling, the draft counting as a one-hot proposal) and spec-decode
  metrics, without vLLM loading a draft into its own KV pool;
- ``additional_config["hippo"]``: the validated hippo settings, which vLLM ships to
  every process and includes in its config hash;
- ``worker_cls``: the hippo worker, whose runner owns the draft engine.

The draft checkpoint is checked against the target here too (family, vocabulary),
so a wrong pair stops ``vllm serve`` with one clear message instead of a worker
traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hippo_vllm.config import ADDITIONAL_CONFIG_KEY, METHOD_NAME, HippoConfig, HippoConfigError
from hippo_vllm.logs import get_logger
from hippo_vllm.vllm.model_families import architecture_of, family_of, supported_architectures

logger = get_logger(__name__)
REFUSAL = "hippo_vllm cannot start with this configuration:"  # starts the one-line error

PROPOSER_CLASS_PATH = "hippo_vllm.vllm.target.proposer.HippoProposer"
CPU_WORKER_PATH = "hippo_vllm.vllm.seam.worker_cpu.HippoCPUWorker"
GPU_WORKER_PATH = "hippo_vllm.vllm.seam.worker_gpu.HippoGPUWorker"

# Draft and target must be vision-language models of one family hippo knows how to
# feed (own vision encoder, positions of kept tokens): see model_families.
SUPPORTED_ARCHITECTURES = tuple(supported_architectures())


def _worker_path() -> str:
    from vllm.platforms import current_platform

    return CPU_WORKER_PATH if current_platform.is_cpu() else GPU_WORKER_PATH


def rewrite_hippo_engine_args(engine_args: Any) -> HippoConfig | None:
    """Rewrite ``engine_args`` in place when it asks for hippo; return the settings."""
    spec = engine_args.speculative_config
    if not isinstance(spec, dict) or spec.get("method") != METHOD_NAME:
        return None
    from hippo_vllm.vllm.seam.version_gate import check_vllm_version

    check_vllm_version()
    hippo = HippoConfig.from_speculative_config(spec)
    if engine_args.worker_cls not in ("auto", _worker_path()):
        raise HippoConfigError(
            f"--worker-cls={engine_args.worker_cls!r} cannot be combined with "
            f'"method": "{METHOD_NAME}", which runs its draft inside its own worker class; '
            f"leave --worker-cls at its default."
        )
    check_engine_features(engine_args)
    logger.info(
        "hippo: %s scheduling, %d tokens per draft chunk",
        "parallel (VPSD)" if hippo.parallel else "draft-then-verify",
        hippo.num_speculative_tokens,
    )
    engine_args.speculative_config = {
        "method": "custom_class",
        "model": PROPOSER_CLASS_PATH,
        "num_speculative_tokens": hippo.vllm_num_speculative_tokens,
    }
    engine_args.additional_config = {
        **(engine_args.additional_config or {}),
        ADDITIONAL_CONFIG_KEY: hippo.to_dict(),
    }
    engine_args.worker_cls = _worker_path()
    return hippo


def check_engine_features(engine_args: Any) -> None:
    """Refuse the engine features hippo cannot run with, naming the flag and why.

    - Pipeline parallelism: the draft runs whole on the output rank and s_attn is
      summed over the tensor-parallel ranks of one stage; with stages, the later
      stages' ranks never see the video's keys (and vLLM's pipeline runner drives
      the drafter differently).
    - Async scheduling: the scheduler then plans step n+1 before step n's tokens are
      sampled and hands the drafter device tensors; hippo drafts from the tokens each
      step committed (vLLM's custom_class proposer takes lists of tokens). vLLM turns
      it off for custom_class proposers when it is left unset.
    """
    pipeline = getattr(engine_args, "pipeline_parallel_size", 1) or 1
    if pipeline > 1:
        raise HippoConfigError(
            f'--pipeline-parallel-size={pipeline} cannot be combined with "method": "{METHOD_NAME}": the draft '
            "runs on the last stage's output rank and the target's attention to the video is summed over one "
            "stage's tensor-parallel ranks. Use --pipeline-parallel-size 1 (tensor parallelism and a draft "
            'worker of its own, "draft_worker": {"placement": "process"}, scale the target instead).'
        )
    if getattr(engine_args, "async_scheduling", None) is True:
        raise HippoConfigError(
            f'--async-scheduling cannot be combined with "method": "{METHOD_NAME}": hippo drafts from the '
            "tokens each step committed, which async scheduling hands out a step later. Leave it unset "
            "(vLLM then turns it off for hippo) or pass --no-async-scheduling."
        )


def _text_vocab_size(hf_config: Any) -> int:
    text = getattr(hf_config, "text_config", None)
    return getattr(text, "vocab_size", None) or hf_config.vocab_size


def _text_num_layers(hf_config: Any) -> int:
    text = getattr(hf_config, "text_config", None)
    return getattr(text, "num_hidden_layers", None) or hf_config.num_hidden_layers


def looks_like_local_path(model: str) -> bool:
    """Whether ``model`` can only be a filesystem path, never a hub id.

    Hugging Face hub ids are ``name`` or ``org/name`` and start with a letter or
    digit; an absolute or ``~``/``.``-relative path, or one with more than one
    ``/``, cannot be one.
    """
    return model.startswith(("/", "~", ".")) or "\\" in model or model.count("/") > 1


def _subject(role: str, hippo: HippoConfig, target_model_config: Any) -> str:
    if role == "draft":
        return f'speculative_config["model"]={hippo.model!r}'
    return f"the target model {target_model_config.model!r}"


def check_draft_against_target(hippo: HippoConfig, target_model_config: Any) -> Any:
    """Refuse a draft that cannot serve this target, naming what is wrong; the draft's HF config."""
    from transformers import AutoConfig

    # Without this, transformers tries such a path as a hub id and answers with
    # the hub's "Repo id must be in the form ..." message.
    if looks_like_local_path(hippo.model) and not Path(hippo.model).expanduser().exists():
        raise HippoConfigError(
            f'speculative_config["model"]={hippo.model!r}: draft checkpoint not found, there is '
            f"no directory {str(Path(hippo.model).expanduser().absolute())!r}. Give the directory "
            f'of a local checkpoint or a Hugging Face hub id ("org/name").'
        )
    try:
        draft_config = AutoConfig.from_pretrained(
            hippo.model, trust_remote_code=target_model_config.trust_remote_code
        )
    except Exception as exc:
        raise HippoConfigError(
            f'speculative_config["model"]={hippo.model!r} could not be loaded as a '
            f"checkpoint: {exc}"
        ) from exc
    target_hf = target_model_config.hf_config
    families = {}
    for role, config in (("target", target_hf), ("draft", draft_config)):
        families[role] = family_of(config)
        if families[role] is None:
            raise HippoConfigError(
                f"{_subject(role, hippo, target_model_config)} is a {architecture_of(config)}, not a "
                f"vision-language model hippo can run as the {role}; supported architectures: "
                f"{list(SUPPORTED_ARCHITECTURES)}."
            )
        problem = families[role].layout_problem(config)
        if problem is not None:
            raise HippoConfigError(
                f"{_subject(role, hippo, target_model_config)} is a {architecture_of(config)} "
                f"({families[role].name} family), but {problem}: hippo's {families[role].name} adapter does "
                f"not know this model's video layout; supported architectures: {list(SUPPORTED_ARCHITECTURES)}, "
                f"with their released checkpoints' video layouts."
            )
    if families["draft"] != families["target"]:
        raise HippoConfigError(
            f'speculative_config["model"]={hippo.model!r} is a {architecture_of(draft_config)} '
            f"({families['draft'].name} family), the target {target_model_config.model!r} a "
            f"{architecture_of(target_hf)} ({families['target'].name} family); the draft must be "
            f"of the target's family ({', '.join(families['target'].architectures)}), which runs on the "
            f"same processor outputs and positions."
        )
    family = families["target"]
    for key in family.vision_input_keys:
        target_value = getattr(target_hf.vision_config, key, None)
        draft_value = getattr(draft_config.vision_config, key, None)
        if target_value != draft_value:
            raise HippoConfigError(
                f'speculative_config["model"]={hippo.model!r} has vision_config.{key}={draft_value!r}, the '
                f"target {target_model_config.model!r} {target_value!r}; the draft's vision tower reads the "
                f"target's processor outputs, so for the {family.name} family "
                f"{', '.join(family.vision_input_keys)} must be the target's."
            )
    check_vocabulary(hippo, draft_config, target_model_config)
    hippo.resolve_attn_layers(_text_num_layers(target_hf))
    return draft_config


def check_vocabulary(hippo: HippoConfig, draft_config: Any, target_model_config: Any) -> None:
    """The draft's tokenizer must be the target's, and its vocabulary no larger.

    Checkpoints of one family pad their embeddings differently (Qwen2.5-VL-3B has
    151,936 rows, 7B and 72B 152,064, for the same 151,665 tokens), so the rows
    may differ; the ids are the tokenizer's. The draft never proposes a row past
    them (``DraftEngine.proposable_ids``).
    """
    from transformers import AutoTokenizer

    target_vocab, draft_vocab = _text_vocab_size(target_model_config.hf_config), _text_vocab_size(draft_config)
    trust = target_model_config.trust_remote_code
    target_tok = AutoTokenizer.from_pretrained(target_model_config.tokenizer, trust_remote_code=trust,
                                               revision=target_model_config.tokenizer_revision)
    try:
        draft_tok = AutoTokenizer.from_pretrained(hippo.model, trust_remote_code=trust)
    except Exception as exc:
        raise HippoConfigError(
            f'speculative_config["model"]={hippo.model!r}: its tokenizer could not be loaded ({exc}); '
            "the draft must come with the target's tokenizer."
        ) from exc
    if draft_tok.get_vocab() != target_tok.get_vocab():
        raise HippoConfigError(
            f'speculative_config["model"]={hippo.model!r} has a tokenizer of {len(draft_tok)} ids that differs '
            f"from the target's ({len(target_tok)} ids); draft and target must share one tokenizer."
        )
    if draft_vocab > target_vocab:
        raise HippoConfigError(
            f'speculative_config["model"]={hippo.model!r} has vocabulary size {draft_vocab}, larger than the '
            f"target's {target_vocab}; the draft's vocabulary (tokenizer ids plus padding rows) must not be "
            "larger than the target's."
        )


def check_draft_parallelism(hippo: HippoConfig, draft_config: Any, parallel_config: Any) -> None:
    """Refuse a mixture-of-experts draft under data parallelism.

    vLLM shards a MoE layer's experts over data x tensor parallel ranks whenever
    data parallelism is on, and every data-parallel rank must join each MoE
    forward; the draft runs on one rank of its replica only, so its experts would
    be split across ranks that never run it. A dense draft is unaffected.
    """
    num_experts = getattr(getattr(draft_config, "text_config", draft_config), "num_experts", None)
    data_parallel = getattr(parallel_config, "data_parallel_size", 1)
    if num_experts and data_parallel > 1:
        raise HippoConfigError(
            f'speculative_config["model"]={hippo.model!r} is a mixture-of-experts model ({num_experts} '
            f"experts) and data_parallel_size is {data_parallel}: a MoE draft runs only with "
            f"data_parallel_size 1. Use a dense draft of the family (any data_parallel_size), or no data "
            f"parallelism."
        )


def install() -> None:
    """Wrap ``EngineArgs.create_engine_config`` (listed in the patch index)."""
    from vllm.engine.arg_utils import EngineArgs

    from hippo_vllm.vllm.patching import patch_attribute

    original = EngineArgs.create_engine_config

    def create_engine_config(self, *args, **kwargs):
        try:
            hippo = rewrite_hippo_engine_args(self)
            vllm_config = original(self, *args, **kwargs)
            if hippo is not None:
                draft_config = check_draft_against_target(hippo, vllm_config.model_config)
                check_draft_parallelism(hippo, draft_config, vllm_config.parallel_config)
        except HippoConfigError as exc:
            # One line naming key, value and what is allowed, ahead of the traceback
            # vLLM's entry points print for a failed start (the message ends it too).
            logger.error("%s %s", REFUSAL, exc)
            raise
        return vllm_config

    create_engine_config.__doc__ = original.__doc__
    patch_attribute(EngineArgs, "create_engine_config", create_engine_config)
