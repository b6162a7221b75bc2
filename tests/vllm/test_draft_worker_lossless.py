"""The draft in a worker of its own ("draft_worker" placement "process" or "ray") is lossless.

Real engines on CPU with the tiny checkpoints, compared with the target alone
(the baselines of test_hippo_lossless). One engine per placement and schedule
serves every case at once: chunked prefill (64-token batches), text, video and
a mixed batch with per-request max_tokens, random aborts, and in VPSD (whose rejected
rounds restart with a chunk the target waits for) random sampling (top_k 1, so its output is the greedy one); with the process placement
also preemption under a small target KV cache (VPSD there with PEARL's adaptive
draft length), and the target as its own draft
accepting every token in both schedules. Faults: the worker is killed and stalled in the
middle of generation; every request still ends with the target's output, the
worker comes back with a new epoch and drafts again, and no worker process
outlives the engine. Under tensor parallelism 2 the worker is started by the
output rank's worker process.
"""

from __future__ import annotations

import os

import pytest

from test_draft_worker_backends import wait_gone

from engine_utils import counter, engine, generate_ids, greedy, hippo_config, proposer_of
from test_hippo_lossless import LONG, PREEMPTED, TARGET_KV_BYTES_PER_TOKEN, _mixed_batch, random_aborts
from test_hippo_lossless import baseline, baselines, requests, tokenizer  # noqa: F401 - shared fixtures

pytestmark = pytest.mark.engine

K = 3
ADAPTIVE_CAP = 6
# The draft's KV cache is in the worker's memory, so the target's budget is all its
# own: three 128-token blocks for up to four requests of ~200 tokens preempt.
SMALL_TARGET = {
    "kv_cache_memory_bytes": 3 * 128 * TARGET_KV_BYTES_PER_TOKEN,
    "max_model_len": 256,
    "max_num_batched_tokens": 64,
    "enable_chunked_prefill": True,
}


def worker_config(draft, parallel, placement, **worker):
    return hippo_config(draft, K, parallel, draft_kv_tokens=1024,
                        draft_worker={"placement": placement, "cpu_cores": [1], **worker})


def child_pids() -> set[int]:
    """This process's live child processes."""
    children = set()
    for task in os.listdir(f"/proc/{os.getpid()}/task"):
        with open(f"/proc/{os.getpid()}/task/{task}/children") as f:
            children.update(int(pid) for pid in f.read().split())
    return children


@pytest.fixture(scope="module")
def ray_instance():
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def recording_work(backend) -> list:
    """Every StepWork the proposer hands ``backend`` from now on."""
    sent, submit = [], backend.submit

    def recording_submit(work):
        sent.append(work)
        return submit(work)

    backend.submit = recording_submit
    return sent


@pytest.mark.parametrize(
    "placement, parallel, length",
    [("process", False, "fixed"), ("process", True, "adaptive"), ("ray", True, "fixed")],
    ids=["process-serial", "process-vpsd-adaptive", "ray-vpsd"],
)
def test_a_draft_worker_of_its_own_is_lossless(placement, parallel, length, tiny, requests, baseline, request):
    from vllm import SamplingParams

    if placement == "ray":
        request.getfixturevalue("ray_instance")
    before = child_pids()
    config = worker_config(tiny.draft, parallel, placement)
    if length == "adaptive":  # PEARL's adaptive length, at most ADAPTIVE_CAP tokens a round
        config.update(draft_length="adaptive", num_speculative_tokens=ADAPTIVE_CAP)
    with engine(tiny.target, speculative_config=config, **SMALL_TARGET) as llm:
        sent = recording_work(proposer_of(llm).draft)
        assert generate_ids(llm, requests, max_tokens=24) == baseline["single"]
        # Each video is encoded as its request arrives (beside the target's prefill), never again.
        encoded = {e.req_id: w.seq for w in sent for e in w.encodes}
        prefilled = {p.req_id: w.seq for w in reversed(sent) for p in w.prefills  # each one's first
                     if p.prompt is not None and p.prompt.mm_features}
        assert len(encoded) == sum("multi_modal_data" in r for r in requests) == len(prefilled)
        assert all(encoded[req_id] < seq for req_id, seq in prefilled.items())
        # ... once per video: requests about the same video share its encode.
        videos = {f.identifier for w in sent for e in w.encodes for f in e.mm_features}
        assert proposer_of(llm).stats.draft_encodes == len(videos) < len(encoded)
        sent.clear()
        assert _mixed_batch(llm, requests) == baseline["mixed"]
        if parallel:  # the random-sampling path of the rejection sampler, deterministic at top_k 1
            random_params = SamplingParams(temperature=0.8, top_k=1, max_tokens=24, ignore_eos=True)
            sampled = llm.generate(requests, random_params, use_tqdm=False)
            assert [tuple(o.outputs[0].token_ids) for o in sampled] == baseline["single"]
        if placement == "process":  # preemption: both schedules with one placement
            assert generate_ids(llm, requests[:PREEMPTED], max_tokens=LONG) == baseline["long"][:PREEMPTED]
            assert counter(llm, "vllm:num_preemptions") > 0
        assert counter(llm, "vllm:spec_decode_num_draft_tokens") > 0
        # With the adaptive length the chunks drafted beside the target's forward come with the
        # time the worker has (restarts, which the target waits for, have a length of their own).
        budgets = [w.time_budget_s for w in sent if w.chunks]
        timed = [b for b in budgets if b is not None]
        assert budgets and bool(timed) == (length == "adaptive") and all(b >= 0 for b in timed)
        random_aborts(llm, requests, 40)
        proposer = proposer_of(llm)
        assert proposer.messages.held_requests() == []
        stats = proposer.stats
        assert stats.draft_round_trips > 0 and stats.draft_views > 0
        # VPSD with a draft of its own restarts a rejected round with a chunk the target waits for.
        assert (stats.round_restarts > 0) == parallel
        assert stats.video_tokens_seen == 7 * (stats.video_tokens_total // 64)
        assert stats.draft_worker_restarts == 0
        if placement == "process":
            worker = proposer.draft.worker_pid
            assert os.sched_getaffinity(worker) == {1}
    if placement == "process":
        assert worker not in child_pids()
    assert child_pids() <= before


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "vpsd"])
def test_self_draft_in_a_worker_accepts_everything(parallel, tiny, requests, baseline):
    # The target as its own draft, seeing the whole video: any position, KV or message
    # error between the two sides would show as rejected tokens.
    config = {**worker_config(tiny.target, parallel, "process"), "keep_ratio": 1.0}
    with engine(tiny.target, speculative_config=config) as llm:
        assert generate_ids(llm, requests, max_tokens=24) == baseline["single"]
        drafted = counter(llm, "vllm:spec_decode_num_draft_tokens")
        accepted = counter(llm, "vllm:spec_decode_num_accepted_tokens")
        stats = proposer_of(llm).stats
    assert drafted > 0 and accepted / drafted >= 0.99, (accepted, drafted)
    assert stats.draft_round_trips > 0
    if parallel:  # each chunk's first token, checked against the target's own token
        assert stats.round_accepted_tokens / stats.round_drafted_tokens >= 0.99


def _generate_stepwise(llm, requests, max_tokens, at_step: dict):
    """Generate with the engine's step loop, calling ``at_step[n]()`` before step n."""
    core = llm.llm_engine
    for i, req in enumerate(requests):
        core.add_request(f"fault{i}", req, greedy(max_tokens))
    outputs, step = {}, 0
    while core.has_unfinished_requests():
        if step in at_step:
            at_step[step]()
        for out in core.step():
            if out.finished:
                outputs[out.request_id] = tuple(out.outputs[0].token_ids)
        step += 1
    return [outputs[f"fault{i}"] for i in range(len(requests))]


def test_a_killed_or_stalled_worker_loses_nothing_and_drafting_comes_back(tiny, requests, baseline):
    import signal
    import time

    before = child_pids()
    config = worker_config(tiny.draft, True, "process", timeout_ms=200, max_restarts=2)
    with engine(tiny.target, speculative_config=config) as llm:
        proposer = proposer_of(llm)
        draft = proposer.draft
        first = draft.worker_pid
        kill = {4: lambda: os.kill(first, signal.SIGKILL)}  # mid-generation
        assert _generate_stepwise(llm, requests, 24, kill) == baseline["single"]
        assert proposer.stats.draft_worker_restarts == 1
        deadline = time.monotonic() + 120
        while draft.epoch < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert draft.epoch == 1 and draft.worker_pid != first
        # Back: the prompts are sent again and it drafts again.
        drafted = counter(llm, "vllm:spec_decode_num_draft_tokens")
        stall = {3: lambda: draft.stall(1.0)}  # busy past the 200 ms deadline
        assert _generate_stepwise(llm, requests, 24, stall) == baseline["single"]
        assert counter(llm, "vllm:spec_decode_num_draft_tokens") > drafted
        assert proposer.stats.draft_dropped_steps > 0
        assert proposer.stats.draft_worker_restarts == 1
    assert child_pids() <= before  # the engine's shutdown stopped the worker


def test_tp2_output_rank_starts_the_worker_and_stays_lossless(tiny, requests, baseline):
    from test_tensor_parallel import cpu_threads_bound_per_rank

    config = worker_config(tiny.draft, True, "process")
    with cpu_threads_bound_per_rank("0|1"):
        with engine(tiny.target, speculative_config=config, tensor_parallel_size=2) as llm:
            assert generate_ids(llm, requests, max_tokens=24) == baseline["single"]
            assert counter(llm, "vllm:spec_decode_num_draft_tokens") > 0

            def report(worker):
                drafter = worker.model_runner.drafter
                draft = drafter.draft
                return (draft is not None, getattr(draft, "worker_pid", None), drafter.stats.draft_round_trips)

            reports = llm.collective_rpc(report)
    assert [has_draft for has_draft, _, _ in reports].count(True) == 1
    ((pid, trips),) = [(pid, trips) for has_draft, pid, trips in reports if has_draft]
    assert trips > 0
    assert wait_gone(pid), "the draft worker outlived the engine"


def test_draft_then_verify_takes_in_late_answers(tiny, requests, baseline):
    """Steps whose answers miss their deadline, among them the prefill step of every
    request: their views, failures and lack of room are read when the answers come,
    the list of late steps stays short, and every request drafts again afterwards."""
    from hippo_vllm.vllm.placements.supervised import MAX_STEPS_BEHIND
    from hippo_vllm.vllm.target.draft_messages import SentStep

    config = worker_config(tiny.draft, False, "process", timeout_ms=200)
    with engine(tiny.target, speculative_config=config) as llm:
        proposer = proposer_of(llm)
        draft, stats = proposer.draft, proposer.stats
        late_lengths, drafted_after, step = [], {}, {"n": 0}
        last_stall = 6
        propose_batch = proposer.propose_batch

        def watched(runner, scheduler_output, sampled):
            drafts = propose_batch(runner, scheduler_output, sampled)
            late_lengths.append(len(proposer.late))
            assert all(isinstance(sent, SentStep) for sent in proposer.late.sent_steps)  # no video data kept
            if step["n"] > last_stall:
                for req_id, d in zip(runner.input_batch.req_ids, drafts):
                    drafted_after[req_id] = drafted_after.get(req_id, 0) + len(d)
            return drafts

        proposer.propose_batch = watched

        def stall_then_count(n):
            def at_step():
                step["n"] = n
                draft.stall(0.5)  # the worker sleeps past this step's 200 ms deadline
            return at_step

        at_step = {n: stall_then_count(n) for n in range(0, last_stall + 1, 2)}
        for n in range(last_stall + 1, 60):
            at_step[n] = (lambda n=n: step.__setitem__("n", n))
        assert _generate_stepwise(llm, requests, 24, at_step) == baseline["single"]
        assert stats.draft_dropped_steps >= 4
        # Every video request's view was read, though its prefill step answered late.
        num_videos = sum("multi_modal_data" in r for r in requests)
        assert stats.video_tokens_total == 64 * num_videos and stats.draft_views >= num_videos
        # Bounded while the stalls pile up (a worker 16 steps behind is restarted), drained after.
        assert max(late_lengths) <= MAX_STEPS_BEHIND and late_lengths[-1] <= 1, late_lengths
        # Every request was still running after the last stall, and drafted again.
        assert len(drafted_after) == len(requests) and all(drafted_after.values()), drafted_after
        assert stats.draft_worker_restarts == 0 and stats.drafting_failures == 0


def test_tp2_a_fault_that_switches_drafting_off_keeps_every_rank_summing_s_attn(tiny, requests, baseline):
    """Under tensor parallelism the ranks sum s_attn (a collective); drafting switched off
    on the output rank must not stop it from joining, or the other rank waits forever."""
    from test_tensor_parallel import cpu_threads_bound_per_rank

    def break_drafting(worker):
        drafter = worker.model_runner.drafter
        if drafter.draft is not None:
            def submit(work):
                raise RuntimeError("injected draft fault")
            drafter.draft.submit = submit
        return drafter.capture is not None and drafter.capture.sums_over_ranks

    def report(worker):
        drafter = worker.model_runner.drafter
        return drafter.draft is not None, drafter.disabled

    config = hippo_config(tiny.draft, K, False, draft_kv_tokens=1024)
    with cpu_threads_bound_per_rank("0|1"):
        with engine(tiny.target, speculative_config=config, tensor_parallel_size=2) as llm:
            assert generate_ids(llm, requests[:2], max_tokens=24) == baseline["single"][:2]
            assert counter(llm, "vllm:spec_decode_num_draft_tokens") > 0
            assert all(llm.collective_rpc(break_drafting))  # every rank sums s_attn
            assert generate_ids(llm, requests, max_tokens=24) == baseline["single"]
            assert sorted(llm.collective_rpc(report)) == [(False, False), (True, True)]
            # New video prefills after drafting stopped: every rank still joins the sum.
            assert generate_ids(llm, requests, max_tokens=24) == baseline["single"]
