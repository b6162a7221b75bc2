"""``bench_e2e.py``'s rows and what it prints: each workload's table and the notes under it.

A row is the dict `summarize` makes of one configuration's batches of one workload
(what ``e2e_step_tracker.StepTracker`` counted); the first row of a workload is the
target alone, every other row's reference.
"""

from __future__ import annotations

import os
import textwrap


def _fmt(value, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def summarize(config, batches: list[dict], video_total: int, num_prompts: int) -> dict:
    """One row: the median batch's counts and times, split as the table prints them.

    ``config`` is ``bench_e2e.Config``; ``batches`` the tracker's summary of each timed batch."""
    ordered = sorted(batches, key=lambda b: b["wall_seconds"])
    batch = ordered[(len(ordered) - 1) // 2]  # the median batch itself (lower median for even counts)
    wall, tokens, forwards = batch["wall_seconds"], batch["generated_tokens"], batch["target_forwards"]
    hippo = batch.get("hippo")
    if hippo is not None:
        times = {"target": hippo["target_step_seconds"], "draft": hippo["draft_seconds"],
                 "draft_prefill": hippo["draft_prefill_seconds"], "scoring": hippo["pruning_seconds"]}
        seen = (hippo["video_tokens_seen"], hippo["video_tokens_total"])
    else:
        # draft_model's proposer prefills the draft inside the same propose() call,
        # so its draft prefill is part of its draft time (None: not separable).
        drafting = config.method == "draft_model"
        times = {"target": batch["runner_seconds"] - batch["drafter_seconds"], "draft": batch["drafter_seconds"],
                 "draft_prefill": None if drafting else 0.0, "scoring": None if drafting else 0.0}
        seen = (0, video_total) if drafting else None
    times["overhead"] = wall - times["target"] - times["draft"] - (times["draft_prefill"] or 0.0)
    # Outside the forwards: with a worker, the target's wait for it is the draft's time, not host work.
    waited = hippo["draft_wait_seconds"] if config.worker else 0.0
    times["forwards"] = batch["forward_seconds"]
    times["host"] = wall - batch["forward_seconds"] - waited
    # The host figures sum over every timed batch: the median batch is a different batch in
    # each row (other videos with --fresh-videos, other step counts), and one batch's host
    # time moves with the machine; the sum compares the same work in every row.
    host_all = sum(b["wall_seconds"] - b["forward_seconds"]
                   - (b["hippo"]["draft_wait_seconds"] if config.worker else 0.0) for b in batches)
    steps_all = sum(b["batched_steps"] for b in batches)
    requests_all = num_prompts * len(batches)
    if config.parallel:
        mat, mat_source = _ratio(hippo["mat_sum"], hippo["mat_runs"]), "HippoStats mat_sum / mat_runs (PEARL runs)"
    elif config.method == "target":
        mat, mat_source = None, "n/a (no drafting)"
    else:
        mat, mat_source = _ratio(batch["spec_round_tokens"], batch["spec_rounds"]), "tokens committed per round"
    row = {
        "name": config.name, "method": config.method, "pair": config.pair,
        "speculative_config": config.speculative_config,
        "wall_seconds": wall, "wall_seconds_all": [b["wall_seconds"] for b in batches],
        # CPU seconds of this process per wall second: drops when another process competes.
        "cores_busy": min(b["cpu_seconds"] / b["wall_seconds"] for b in batches),
        "cores_allowed": len(config.cores) if config.cores else len(os.sched_getaffinity(0)),
        "generated_tokens": tokens, "tokens_per_second": tokens / wall,
        "target_forwards": forwards, "batched_target_steps": batch["batched_steps"],
        "tokens_per_target_forward": _ratio(tokens, forwards),
        "host_ms_per_target_step": _ratio(1e3 * host_all, steps_all),
        # The same split: the steps that prefill a request (its video's processing, hippo's
        # scoring and view) apart from the decode steps, whose host work is per step (the
        # median batch's median decode step).
        "host_ms_per_decode_step": (None if batch["host_decode_step_median_seconds"] is None
                                    else 1e3 * batch["host_decode_step_median_seconds"]),
        "host_ms_prefill_per_request": 1e3 * sum(b["host_prefill_steps_seconds"] for b in batches) / requests_all,
        # Inside the engine's steps only: without the requests' rendering before their first
        # step (the video's decoding and HF processing, the same work in every row), which
        # the figure per target step spreads over fewer steps the more a row commits per step.
        "host_ms_per_engine_step": _ratio(1e3 * sum(b["host_engine_steps_seconds"] for b in batches), steps_all),
        # And per request, all of it: what the host spends on a request, however many steps.
        "host_ms_per_request": 1e3 * host_all / requests_all,
        "mat": mat, "mat_source": mat_source,
        "spec_acceptance_rate": _ratio(batch["spec_accepted"], batch["spec_drafted"]),
        "video_tokens_seen": seen[0] if seen else None, "video_tokens_total": seen[1] if seen else video_total,
        "seconds": times, "runner_seconds": batch["runner_seconds"], "tracker": batch,
        # Target steps from each request's first token to its first step verifying drafts (hippo).
        "first_draft_steps": _ratio(hippo["first_draft_steps"], hippo["first_drafts"]) if hippo else None,
        "lossless": {"checked_batches": len(batches) + 1, "checked_outputs": (len(batches) + 1) * num_prompts,
                     "equal_to_target": True},
    }
    if config.worker:
        row["worker"] = {
            "overlap_efficiency": _ratio(batch["overlap_busy_seconds"], batch["overlap_step_seconds"]),
            "target_waited_seconds": hippo["draft_wait_seconds"],
            "round_trips": hippo["draft_round_trips"],
            "round_trip_seconds": hippo["draft_round_trip_seconds"],
            "dropped_steps": hippo["draft_dropped_steps"],
            "restarts": hippo["draft_worker_restarts"],
        }
    return row


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def by_workload(rows: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for row in rows:
        grouped.setdefault(row["workload"], []).append(row)
    return grouped


def print_table(rows: list[dict]) -> None:
    for workload, group in by_workload(rows).items():
        print(f"\n== {workload} ({group[0]['lossless']['checked_outputs'] // group[0]['lossless']['checked_batches']}"
              f" prompts, {group[0]['generated_tokens']} tokens generated)")
        _print_workload_table(group)
    print("wall: generation of the batch (median of repeats, engine start excluded); x tgt: target wall / wall\n"
          "(with --fresh-videos, whose batches differ, over all timed batches together);\n"
          "fwd: target forwards (one request in one step that produced tokens); tok/fwd: generated / fwd;\n"
          "MAT: tokens per accepted run incl. the correction (PEARL +1; serial: per round with spec tokens);\n"
          "target/draft: time in target steps / drafting; d.prefill: draft views + draft prefill (scoring\n"
          "included, shown apart; draft_model prefills inside its draft time); overhead: the rest;\n"
          "host/step: wall minus every model forward in this process (and, with a worker, the wait for it),\n"
          "per target engine step, in ms, over all timed batches (split below: decode steps and the steps\n"
          "that prefill).")


def times_faster(base: dict, row: dict) -> float:
    """How many times faster ``row`` ran than ``base``: their median batches', or with
    --fresh-videos (every batch different, the same ones in every row) all timed batches'."""
    if row["fresh_videos"]:
        return sum(base["wall_seconds_all"]) / sum(row["wall_seconds_all"])
    return base["wall_seconds"] / row["wall_seconds"]


def _print_workload_table(rows: list[dict]) -> None:
    base = rows[0]
    header = (f"{'configuration':<28} {'wall s':>7} {'x tgt':>6} {'tok/s':>7} {'fwd':>5} {'tok/fwd':>7} "
              f"{'MAT':>5} {'video seen':>10} {'target s':>8} {'draft s':>7} {'d.prefill s':>11} "
              f"{'(scoring)':>9} {'overhead':>8} {'host/step':>9}")
    print(header)
    print("-" * len(header))
    for row in rows:
        s = row["seconds"]
        seen = row["video_tokens_seen"]
        seen = "n/a" if seen is None else f"{seen}/{row['video_tokens_total']}"
        print(f"{row['name']:<28} {row['wall_seconds']:>7.3f} {times_faster(base, row):>6.2f} "
              f"{row['tokens_per_second']:>7.1f} {row['target_forwards']:>5} "
              f"{_fmt(row['tokens_per_target_forward'], '.2f'):>7} {_fmt(row['mat'], '.2f'):>5} {seen:>10} "
              f"{s['target']:>8.3f} {s['draft']:>7.3f} {_fmt(s['draft_prefill'], '.3f', 'in draft'):>11} "
              f"{_fmt(s['scoring'], '.4f'):>9} {s['overhead']:>8.3f} {_fmt(row['host_ms_per_target_step'], '.2f'):>9}")


def print_note(rows: list[dict], cpu_count: int | None, threads: int, cores: tuple[int, int]) -> None:
    """The notes under the tables; ``cores``: the worker rows' (target core, draft core)."""
    print(f"\nNote: {cpu_count} CPU cores, torch with {threads} threads; in the rows without a worker the draft\n"
          f"runs in the target's process, so its time adds to the target's.")
    for workload, group in by_workload(rows).items():
        print(f"\n== {workload}")
        _print_workload_note(group, cores)
    print("Even the tiny draft (one or two layers of width 128 vs three of 192) costs a large share of the\n"
          "target's time: at this size per-call overhead rather than FLOPs sets most of the cost\n"
          "(Qwen2.5-VL-7B has ~1/10 of 72B's parameters).")


def _busy_share(row: dict) -> float:
    """Busy share of the cores the row may use (the rows bound to one core use one)."""
    return row["cores_busy"] / row["cores_allowed"]


def timing_warning(row: dict, top_share: float) -> str | None:
    """Why the row's timings look disturbed (None: they do not). ``top_share``: the
    workload's best busy share."""
    walls = row["wall_seconds_all"]
    # Fresh-video batches differ by design; repeated ones should take about the same time.
    spread = not row["fresh_videos"] and max(walls) > 1.5 * min(walls)
    if not spread and _busy_share(row) >= 0.75 * top_share:
        return None
    return (f"WARNING: '{row['name']}' batches took {min(walls):.3f}-{max(walls):.3f} s, with as few as "
            f"{row['cores_busy']:.2f} of its {row['cores_allowed']} cores busy: another process was "
            f"probably using the CPU, so these timings are unreliable.")


def _print_workload_note(rows: list[dict], cores: tuple[int, int]) -> None:
    target_core, draft_core = cores
    base = rows[0]
    fastest = max(rows, key=lambda r: times_faster(base, r))
    print(f"Measured fastest: '{fastest['name']}', {times_faster(base, fastest):.2f}x the target alone.")
    top = max(_busy_share(row) for row in rows)
    for row in rows:
        warning = timing_warning(row, top)
        if warning:
            print(warning)
    workers = [row for row in rows if "worker" in row]
    if workers:
        bound = next(row for row in rows if row["name"] == "target core0")
        print(f"Measured, draft in a worker process of its own (target on core {target_core}, draft on core "
              f"{draft_core}):")
        for row in workers:
            w = row["worker"]
            mean_trip = 1e3 * w["round_trip_seconds"] / w["round_trips"] if w["round_trips"] else float("nan")
            print(f"  {row['name']:<28} overlap efficiency {_fmt(w['overlap_efficiency'], '.2f')} "
                  f"(max(target step, draft) / step time), wall {row['wall_seconds']:.3f} s = "
                  f"{times_faster(bound, row):.2f}x the target on core {target_core}, "
                  f"{times_faster(base, row):.2f}x the target on all cores; target waited "
                  f"{w['target_waited_seconds']:.3f} s for the draft, round trip {mean_trip:.1f} ms, "
                  f"{w['dropped_steps']} steps without drafts, {w['restarts']} restarts")
    _print_list("Target steps from a request's first token to its first drafted step (mean):",
                [(r, r["first_draft_steps"], "") for r in rows if r["first_draft_steps"] is not None])
    _print_list("Draft time / target time:", [(r, r["seconds"]["draft"] / r["seconds"]["target"], "")
                                              for r in rows if r["seconds"]["draft"]])
    # Spec tokens lengthen each target step; on a CPU that eats much of what fewer steps save.
    per_step = [(r, 1e3 * r["seconds"]["target"] / r["batched_target_steps"], "ms") for r in rows]
    _print_list("Target time per engine step:", per_step)
    reference = next((r for r in rows if r["method"] == "draft_model"), None)
    for key, title in (("host_ms_per_target_step", "Host time outside the model forwards per target step:"),
                       ("host_ms_per_decode_step", "  ... the median decode step's:"),
                       ("host_ms_prefill_per_request", "  ... the prefill steps', per request:"),
                       ("host_ms_per_engine_step", "  ... inside the engine's steps only (no request rendering):"),
                       ("host_ms_per_request", "Host time outside the model forwards per request, all of it:")):
        _print_list(title, [(r, r[key], "ms") for r in rows if r.get(key) is not None])
        if reference is not None and reference.get(key):
            _print_list("    relative to draft_model's:", [(r, r[key] / reference[key], "x")
                                                           for r in rows if r["method"] == "hippo" and r[key]])


def _print_list(title: str, items: list[tuple[dict, float, str]]) -> None:
    text = ", ".join(f"{row['name']} {value:.2f}{unit}" for row, value, unit in items)
    print(title)
    print(textwrap.fill(text, width=100, initial_indent="  ", subsequent_indent="  ", break_on_hyphens=False))
