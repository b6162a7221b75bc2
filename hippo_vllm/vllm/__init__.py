"""Everything in hippo_vllm that imports vLLM, in five wings over a few shared modules.

From the top down (a module imports only from its own wing or a wing below it;
``tests/vllm/test_layering.py`` holds the rule):

- ``seam/``: where vLLM meets hippo: the plugin entry, the config rewrite, the hippo
  workers and model runner, and the fixes to vLLM itself.
- ``target/``: the target's side of drafting, in the output-rank worker: the
  proposer, the per-step records of vLLM's state, the attention capture, the
  schedules (draft-then-verify, VPSD) and the failure policy.
- ``placements/``: where the draft runs, behind one interface (``backend``): in
  the target's process, in a worker process of its own, or as a Ray actor.
- ``draft/``: the draft's side: the draft worker, its engine, KV cache and views.
- ``metrics/``: hippo's counters and how they reach vLLM's log and ``/metrics``.
- shared modules: ``protocol`` (the messages between the two sides),
  ``model_families``, ``tensor_parallel``, ``patching`` and ``patch_index``.

vLLM calls :func:`hippo_vllm.vllm.seam.plugin.register` in each of its processes
through the ``vllm.general_plugins`` entry point. The ``__init__`` files stay
import-free so that resolving the entry point costs nothing.
"""
