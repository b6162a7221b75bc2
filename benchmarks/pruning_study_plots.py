"""The pruning study's pictures (bench_pruning_study.py): small PNGs a person reads at a glance.

1. ``pruning_study_mat.png``: acceptance rate, the draft's answer accuracy and MAT in
   both schedules against the keep ratio, one line per method; ``none`` (whole video)
   and ``no video`` as horizontal references.
2. ``pruning_study_boundary.png``: share of the kept tokens on the frame border ring
   (against the ring's share of all tokens) and share of the question object's
   tokens kept, per method and keep ratio.
3. ``pruning_study_kept_tokens.png``: one video's frames with each method's kept
   tokens, the dropped ones darkened.
"""

from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

DPI = 72
COLOURS = {"holistic": "tab:red", "attention": "tab:blue", "temporal": "tab:green", "uniform": "tab:gray",
           "specvlm": "tab:purple"}
REFERENCES = {"none": ("black", "--"), "no video": ("black", ":")}
FRAMES_SHOWN = 4


def write_plots(result: dict, questions: list, folder: pathlib.Path) -> list[pathlib.Path]:
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    title = f"pair '{result['pair']['name']}'" + ("" if result["claim_tested"] else " (random weights)")
    written = [_curves(result, folder / "pruning_study_mat.png", title),
               _boundary(result, folder / "pruning_study_boundary.png", title)]
    kept = _kept_tokens(result, questions, folder / "pruning_study_kept_tokens.png", title)
    if kept is not None:
        written.append(kept)
    return written


def _grid_rows(result: dict) -> dict[str, list[dict]]:
    by_method: dict[str, list[dict]] = {}
    for row in result["rows"]:
        if row["group"] == "grid":
            by_method.setdefault(row["method"], []).append(row)
    return {m: sorted(rows, key=lambda r: r["keep_ratio"]) for m, rows in by_method.items()}


def _curves(result: dict, path: pathlib.Path, title: str) -> pathlib.Path:
    panels = (("acceptance_rate", "acceptance rate"), ("draft_accuracy", "draft's answer accuracy"),
              ("mat_serial", "MAT, draft-then-verify"), ("mat_parallel", "MAT, parallel (PEARL)"))
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.2), sharex=True)
    grid = _grid_rows(result)
    references = {r["name"]: r for r in result["rows"] if r["group"] == "reference"}
    for ax, (key, label) in zip(axes.flat, panels):
        for method, rows in grid.items():
            points = [(r["keep_ratio"], r[key]) for r in rows if r[key] is not None]
            if points:
                ax.plot(*zip(*points), marker="o", color=COLOURS.get(method), label=method)
        for name, row in references.items():
            if row[key] is not None:
                colour, style = REFERENCES[name]
                ax.axhline(row[key], color=colour, linestyle=style, linewidth=1, label=name)
        if key == "draft_accuracy":
            ax.axhline(result["target"]["accuracy"], color="tab:orange", linewidth=1, label="target alone")
        ax.set_xscale("log")
        ratios = result["settings"]["keep_ratios"]
        ax.set_xticks(ratios, [f"{r:g}" for r in ratios])
        ax.minorticks_off()
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("keep ratio (share of video tokens the draft sees)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    extra = [(h, lab) for h, lab in zip(*axes[0, 1].get_legend_handles_labels()) if lab not in labels]
    fig.legend(handles + [h for h, _ in extra], labels + [lab for _, lab in extra], loc="lower center",
               ncol=8, fontsize=8, frameon=False)
    fig.suptitle(f"Pruning methods against keep ratio, {title}", fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _boundary(result: dict, path: pathlib.Path, title: str) -> pathlib.Path:
    grid = _grid_rows(result)
    methods = list(grid)
    ratios = result["settings"]["keep_ratios"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.7))
    width = 0.8 / max(1, len(methods))
    for ax, key, label in ((axes[0], "boundary_share", "share of kept tokens on the frame border"),
                           (axes[1], "object_token_recall", "share of the question object's tokens kept")):
        for i, method in enumerate(methods):
            values = {r["keep_ratio"]: r[key] for r in grid[method]}
            xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(ratios))]
            ax.bar(xs, [values.get(r) or 0.0 for r in ratios], width, color=COLOURS.get(method), label=method)
        ax.set_xticks(range(len(ratios)), [f"{r:g}" for r in ratios])
        ax.set_xlabel("keep ratio")
        ax.set_title(label, fontsize=10)
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    ring = _ring_share(result)
    if ring is not None:
        axes[0].axhline(ring, color="black", linestyle="--", linewidth=1, label="border's share of all tokens")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=7, fontsize=8, frameon=False)
    fig.suptitle(f"Where the kept tokens are, {title}", fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _ring_share(result: dict) -> float | None:
    from hippo_vllm.core import VideoGrid

    for row in result["rows"]:
        selection = row["runs"][next(iter(row["runs"]))].get("selection")
        if selection:
            return VideoGrid(*selection["grid"]).boundary_mask().float().mean().item()
    return None


def _kept_tokens(result: dict, questions: list, path: pathlib.Path, title: str) -> pathlib.Path | None:
    """The first border-texture question's video (else the first), at the picture's keep ratio."""
    rows = [r for r in result["rows"] if r["group"] == "grid"]
    if not rows:
        return None
    ratio = min({r["keep_ratio"] for r in rows}, key=lambda k: abs(k - 0.1))
    rows = [r for r in rows if r["keep_ratio"] == ratio]
    index = next((i for i, q in enumerate(questions) if q.kind == "border_texture"), 0)
    frames = np.asarray(questions[index].frames[0])
    selection = rows[0]["runs"]["serial"]["selection"]
    t, h, w = selection["grid"]
    shown = sorted({round(x) for x in np.linspace(0, t - 1, min(FRAMES_SHOWN, t))})
    fig, axes = plt.subplots(len(rows), len(shown), figsize=(1.2 * len(shown) + 0.5, 1.2 * len(rows) + 0.6),
                             squeeze=False)
    cell_h, cell_w = frames.shape[1] / h, frames.shape[2] / w
    for r, row in enumerate(rows):
        kept = set(row["runs"]["serial"]["selection"]["kept"][index])
        for c, frame_t in enumerate(shown):
            ax = axes[r, c]
            image = frames[min(2 * frame_t, len(frames) - 1)].astype(np.float32)
            dim = np.full((h, w), 0.25, dtype=np.float32)
            for token in kept:
                tt, rest = divmod(token, h * w)
                if tt == frame_t:
                    dim[rest // w, rest % w] = 1.0
            shade = np.kron(dim, np.ones((int(cell_h), int(cell_w)), dtype=np.float32))
            ax.imshow((image * shade[..., None]).astype(np.uint8), interpolation="nearest")
            for token in kept:
                tt, rest = divmod(token, h * w)
                if tt == frame_t:
                    y, x = rest // w, rest % w
                    ax.add_patch(plt.Rectangle((x * cell_w - 0.5, y * cell_h - 0.5), cell_w, cell_h, fill=False,
                                               edgecolor="yellow", linewidth=1))
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(row["method"], fontsize=9)
            if r == 0:
                ax.set_title(f"token frame {frame_t}", fontsize=8)
    question = questions[index]
    fig.suptitle(f"Kept tokens at keep ratio {ratio:g}, {title}\n{question.kind}: \"{question.question}\"",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
