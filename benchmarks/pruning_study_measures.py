"""What the pruning study measures: the draft's views and answers, and the figures of each row.

`ViewRecorder` records, on one engine's in-process draft worker, every view it builds (the
video tokens kept) and, on request, the draft's own greedy answer from that view;
`selection_figures` and `draft_answer_figures` turn them into a row's figures (questions
are ``bench_pruning_study.Question``, rows its ``Variant``), `summarize` and
`print_table` make and print the rows.
"""

from __future__ import annotations


def is_correct(text: str, answer: str) -> bool:
    """The answer's first sentence, case and spacing aside, is the expected sentence (for a
    description, whose first sentence is only the count: the whole answer)."""
    if answer.startswith("There are") and answer.count(".") > 1:
        return " ".join(text.split()) == " ".join(answer.split())

    def first_sentence(s: str) -> str:
        s = " ".join(s.lower().split())
        return s[: s.index(".") + 1] if "." in s else s

    return first_sentence(text) == first_sentence(answer)


def proposer_of(llm):
    return llm.llm_engine.model_executor.driver_worker.worker.model_runner.drafter


def draft_worker_of(llm):
    """The draft's side, in the target's process (the default in-process placement)."""
    return proposer_of(llm).draft.worker


class ViewRecorder:
    """Every draft view the engine builds, by request, with the video's kept token indices;
    with ``answer_tokens`` > 0 also the draft's greedy answer from that view."""

    def __init__(self, llm, answer_tokens: int, stop_ids: set[int]):
        import torch

        from hippo_vllm.vllm.draft.view import video_embed_rows

        self.proposer = proposer_of(llm)
        self.worker = worker = draft_worker_of(llm)
        self.views: dict[str, dict] = {}
        self.answers: dict[str, list[int] | str] = {}
        views, build, build_new = worker.views, worker.views.build, worker.views.build_new

        def record(req_id, prompt, view):
            videos = [f for f in prompt.mm_features if f.modality == "video"]
            entry = {"view": view}
            if len(videos) == 1:
                pos = videos[0].mm_position
                video_rows = pos.offset + video_embed_rows(pos)  # the placeholder's video rows
                kept = torch.nonzero(torch.isin(video_rows, view.keep_rows)).flatten()
                grid = views.video_grid(videos[0])
                entry.update(kept=kept.tolist(), grid=(grid.t, grid.h, grid.w))
            self.views[external_id(req_id)] = entry

        def recording_build(req_id, prompt, item_embeds, attention):  # a view built alone, or reused
            view = build(req_id, prompt, item_embeds, attention)
            record(req_id, prompt, view)
            return view

        def recording_build_new(requests):  # new views, a step's built together
            built = build_new(requests)
            for (req_id, prompt, _, _), view in zip(requests, built):
                record(req_id, prompt, view)
            return built

        views.build, views.build_new = recording_build, recording_build_new  # on this instance only
        if answer_tokens > 0:
            self._wrap_prefill(answer_tokens, stop_ids)

    def _wrap_prefill(self, answer_tokens: int, stop_ids: set[int]) -> None:
        worker = self.worker
        prefill_all = worker._prefill_all

        def answering_prefill_all(prefills, result):
            before = set(worker._states)
            engine = worker.engine
            last = {}  # request -> the logits of its last prefilled row (a step's prefills share forwards)
            run = engine.run

            def recording_run(inputs):
                logits = run(inputs)
                for row, inp in enumerate(inputs):
                    last[inp.req_id] = logits[row]
                return logits

            engine.run = recording_run
            try:
                prefill_all(prefills, result)
            finally:
                del engine.run  # the class's method again
            for req_id in (p.req_id for p in prefills):
                key = external_id(req_id)
                if req_id not in before and req_id in worker._states and key not in self.answers:
                    self.answers[key] = self._draft_answer(req_id, last[req_id], answer_tokens, stop_ids)

        worker._prefill_all = answering_prefill_all  # on this instance only

    def _draft_answer(self, req_id, logits, max_tokens: int, stop_ids: set[int]):
        """The draft's greedy answer from its just-prefilled view; its KV is rolled back after."""
        import torch

        from hippo_vllm.vllm.draft.engine import DraftCapacityError, DraftInput

        engine, state = self.worker.engine, self.worker._states[req_id]
        tokens: list[int] = []
        try:
            token = int(logits.argmax())
            while True:
                tokens.append(token)
                if token in stop_ids or len(tokens) == max_tokens:
                    return tokens
                position = torch.full((3, 1), state.output_position(len(tokens) - 1), dtype=torch.long)
                out = engine.run([DraftInput(req_id, position, token_ids=torch.tensor([token]))])
                token = int(out[0].argmax())
        except DraftCapacityError:
            return "draft KV cache full"
        finally:
            engine.truncate(req_id, state.view.compact_len)


def external_id(req_id: str) -> str:
    """vLLM's engine adds ``-<8 characters>`` to the id LLM.generate assigns (and returns)."""
    return req_id.rsplit("-", 1)[0]


def ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def selection_figures(views: dict, outputs, questions: list) -> dict:
    """Boundary ratio, video seen, and recall of the question's object tokens, over the questions."""
    import torch

    from hippo_vllm.core import VideoGrid, position_bias

    bsr, ring_share, seen, recall, kept_lists = [], [], [], [], []
    by_kind: dict[str, dict[str, list[float]]] = {}
    for output, question in zip(outputs, questions):
        kind = by_kind.setdefault(question.kind, {"boundary_share": [], "object_token_recall": []})
        record = views.get(output.request_id)
        if record is None or "kept" not in record:
            raise SystemExit(f"no draft view was recorded for question {output.request_id}")
        kept, grid = record["kept"], VideoGrid(*record["grid"])
        kept_lists.append(kept)
        seen.append(len(kept) / grid.num_tokens)
        if kept:
            ring = grid.boundary_mask()
            bsr.append(position_bias(torch.tensor(kept), grid))
            ring_share.append(ring[torch.tensor(kept)].float().mean().item())
            kind["boundary_share"].append(ring_share[-1])
        object_tokens = object_token_mask(question, grid)
        if object_tokens is not None and object_tokens.any():
            hit = object_tokens[torch.tensor(kept, dtype=torch.long)].sum().item() if kept else 0
            recall.append(hit / object_tokens.sum().item())
            kind["object_token_recall"].append(recall[-1])
    return {"video_share_seen": _mean(seen), "boundary_selection_ratio": _mean(bsr),
            "boundary_share": _mean(ring_share), "object_token_recall": _mean(recall),
            "by_kind": {k: {key: _mean(v) for key, v in figures.items()} for k, figures in by_kind.items()},
            "kept": kept_lists, "grid": list(views[outputs[0].request_id]["grid"])}


def object_token_mask(question, grid) -> object:
    """bool [N]: the tokens whose pixels (2 frames x a merged patch) show the question's object.

    None when the decoded video does not map onto the grid that way (a resized video).
    """
    import numpy as np
    import torch

    masks = question.masks
    frames, height, width = masks.shape
    if frames != 2 * grid.t or height % grid.h or width % grid.w:
        return None
    wanted = np.isin(masks, question.object_labels)
    cells = wanted.reshape(grid.t, 2, grid.h, height // grid.h, grid.w, width // grid.w).any(axis=(1, 3, 5))
    return torch.from_numpy(cells.reshape(-1))


def draft_answer_figures(answers: dict, outputs, questions: list, tokenizer) -> dict:
    texts, correct, as_target = [], 0, 0
    by_kind: dict[str, list[bool]] = {}
    for output, question in zip(outputs, questions):
        tokens = answers.get(output.request_id)
        if tokens is None or isinstance(tokens, str):
            raise SystemExit(f"no draft answer for question {output.request_id}: {tokens or 'not read'}")
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        texts.append(text)
        correct += is_correct(text, question.answer)
        by_kind.setdefault(question.kind, []).append(is_correct(text, question.answer))
        as_target += tokens == list(output.outputs[0].token_ids)
    # same_as_target: share of draft answers token-identical to the target's (whole video) answer.
    return {"accuracy": correct / len(questions), "same_as_target": as_target / len(questions),
            "accuracy_by_kind": {kind: sum(hits) / len(hits) for kind, hits in by_kind.items()}, "texts": texts}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(variant, runs: dict[str, dict]) -> dict:
    """The row's headline figures: schedule-independent ones from its first schedule."""
    first = runs[variant.schedules[0]]
    selection = first["selection"]
    return {
        "name": variant.name, "group": variant.group, "method": variant.method, "keep_ratio": variant.keep_ratio,
        "hippo_keys": variant.keys,
        "acceptance_rate": first["acceptance_rate"],
        "mat_serial": runs["serial"]["mat"] if "serial" in runs else None,
        "mat_parallel": runs["parallel"]["mat"] if "parallel" in runs else None,
        "tokens_per_target_forward_parallel": runs.get("parallel", {}).get("tokens_per_target_forward"),
        "draft_accuracy": first["draft_answers"]["accuracy"],
        "draft_same_as_target": first["draft_answers"]["same_as_target"],
        "boundary_selection_ratio": selection["boundary_selection_ratio"],
        "boundary_share": selection["boundary_share"],
        "object_token_recall": selection["object_token_recall"],
        "video_share_seen": selection["video_share_seen"],
        # per scene kind: draft_accuracy, boundary_share, object_token_recall
        "by_kind": {kind: {"draft_accuracy": first["draft_answers"]["accuracy_by_kind"][kind], **figures}
                    for kind, figures in selection["by_kind"].items()},
        "lossless": all(run["lossless"] for run in runs.values()),
        "drafted_tokens": {s: run["vllm"]["num_draft_tokens"] for s, run in runs.items()},
        "runs": runs,
    }


def print_table(rows: list[dict], target: dict) -> None:
    header = (f"{'row':<20} {'keep':>5} {'accept':>7} {'MAT ser':>7} {'MAT par':>7} {'tok/fwd':>7} "
              f"{'draft acc':>9} {'BSR':>5} {'border':>6} {'obj rec':>7}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['name']:<20} {r['keep_ratio']:>5.2f} {_fmt(r['acceptance_rate'], '.3f'):>7} "
              f"{_fmt(r['mat_serial'], '.2f'):>7} {_fmt(r['mat_parallel'], '.2f'):>7} "
              f"{_fmt(r['tokens_per_target_forward_parallel'], '.2f'):>7} {r['draft_accuracy']:>9.2f} "
              f"{_fmt(r['boundary_selection_ratio'], '.2f'):>5} {_fmt(r['boundary_share'], '.2f'):>6} "
              f"{_fmt(r['object_token_recall'], '.2f'):>7}")
    print(f"target alone (full video): answer accuracy {target['accuracy']:.2f}")
    print("accept: vLLM accepted / draft tokens (default schedule); MAT ser: 1 + accepted / drafts; MAT par: PEARL\n"
          "MAT (+1); tok/fwd: tokens per target forward (parallel); draft acc: the draft's own greedy answer\n"
          "from its view; BSR: boundary selection ratio (1 = no border bias); border: share of kept tokens on\n"
          "the frame ring; obj rec: share of the question object's tokens the draft kept.")


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)
