"""Render the documentation's tables that repeat the code, so they cannot drift from it.

Each table sits between two comment lines in a Markdown file (README.md or docs/*.md):

    <!-- begin: hippo-config -->
    ...
    <!-- end: hippo-config -->

and is rendered from its source in the code:

- ``hippo-config`` / ``draft-worker-config``: the fields of ``HippoConfig`` /
  ``DraftWorkerConfig`` (order, name, default) and ``KEY_MEANINGS`` /
  ``DRAFT_WORKER_KEY_MEANINGS`` (hippo_vllm/config.py);
- ``hippo-metrics``: ``EXPORTED_STATS`` (hippo_vllm/vllm/metrics/stats.py), each
  counter's Prometheus name and its help text as /metrics shows it.

The markers travel with a table, so a table moved to another file keeps being checked.
``python tools/render_readme_tables.py`` lists the tables that differ (exit status 1);
``--write`` rewrites them. tests/test_readme_tables.py runs the check.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_BLOCK = re.compile(r"(<!-- begin: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- end: (?P=name) -->)", re.S)


def _json(value) -> str:
    """A default as the user writes it in the JSON config (1000.0 as 1000)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, tuple):
        value = list(value)
    return json.dumps(value)


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        return f"`{_json(field.default)}`"
    if field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
        if dataclasses.is_dataclass(value):
            # A nested config by the key that decides what the others mean.
            first = dataclasses.fields(value)[0].name
            return f"`{{{json.dumps(first)}: {_json(getattr(value, first))}}}`"
        return f"`{_json(value)}`"
    return "required"


def _config_table(cls, meanings: dict[str, str], key_header: str) -> str:
    fields = dataclasses.fields(cls)
    missing = [f.name for f in fields if f.name not in meanings]
    extra = sorted(set(meanings) - {f.name for f in fields})
    if missing or extra:
        raise SystemExit(f"{cls.__name__}: keys without a meaning {missing}, meanings without a key {extra} "
                         "(hippo_vllm/config.py)")
    rows = [f"| {key_header} | default | meaning |", "|---|---|---|"]
    rows += [f"| `{f.name}` | {_default(f)} | {meanings[f.name]} |" for f in fields]
    return "\n".join(rows) + "\n"


def hippo_config() -> str:
    from hippo_vllm.config import KEY_MEANINGS, HippoConfig

    return _config_table(HippoConfig, KEY_MEANINGS, "key")


def draft_worker_config() -> str:
    from hippo_vllm.config import DRAFT_WORKER_KEY_MEANINGS, DraftWorkerConfig

    return _config_table(DraftWorkerConfig, DRAFT_WORKER_KEY_MEANINGS, "`draft_worker` key")


def hippo_metrics() -> str:
    from hippo_vllm.vllm.metrics.stats import EXPORTED_STATS, metric_name

    rows = ["| metric | meaning |", "|---|---|"]
    rows += [f"| `{metric_name(field)}` | {help_text} |" for field, help_text in EXPORTED_STATS.items()]
    return "\n".join(rows) + "\n"


TABLES: dict[str, Callable[[], str]] = {
    "hippo-config": hippo_config,
    "draft-worker-config": draft_worker_config,
    "hippo-metrics": hippo_metrics,
}


def documents(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def render(text: str) -> str:
    """``text`` with every marked table rendered anew."""
    def block(match: re.Match) -> str:
        name = match["name"]
        if name not in TABLES:
            raise SystemExit(f"unknown table {name!r}; known: {sorted(TABLES)}")
        return match.group(1) + TABLES[name]() + match.group(4)

    return _BLOCK.sub(block, text)


def tables_in(text: str) -> list[str]:
    return [m["name"] for m in _BLOCK.finditer(text)]


def stale(root: Path = ROOT) -> dict[Path, str]:
    """Each document whose marked tables differ from the code, with its rendering."""
    out = {}
    for path in documents(root):
        text = path.read_text()
        rendered = render(text)
        if rendered != text:
            out[path] = rendered
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite the tables that differ")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    differing = stale()
    for path, rendered in differing.items():
        if args.write:
            path.write_text(rendered)
        print(f"{'rewrote' if args.write else 'differs from the code'}: {path.relative_to(ROOT)}")
    return 1 if differing and not args.write else 0


if __name__ == "__main__":
    sys.exit(main())
