"""Generate docs/config.md from the field declarations: `python -m neox_l2e.config.docs > docs/config.md`."""

from __future__ import annotations

import dataclasses

from .schema import SECTIONS


def _default(f) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        value = None
    return "—" if value is None else f"`{value}`".replace("|", "\\|")


def render() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Generated from `neox_l2e/config/schema.py` by `python -m neox_l2e.config.docs`; a test keeps it current.",
        "Keys are NeoX keys: hyphens and underscores are interchangeable. Several yml files are merged; a key set",
        "in two files is an error. *used* = read by neox-l2e; *ignored* = accepted so NeoX/Pythia configs load",
        "unchanged, with no effect here (the doc says why).",
        "",
        "`key=value` on the command line overrides a key (the value is read as YAML: numbers, lists, mappings),",
        "also one a file spells by an alias. Every value is checked when the config loads; a bad one is one line",
        "`error: FILE: key: ...` (FILE is `<override>` for a command-line value): numbers must be finite (no NaN",
        "or inf), counts and intervals >= 1, `layernorm-epsilon`, `optimizer.params.eps` and sizes positive,",
        "`weight-decay` and `gradient-clipping` >= 0, `optimizer.params.betas` two numbers in [0, 1),",
        "`zero_optimization.stage` 0-3, `l2e-layers` a preset or a list of integer layer indices. Keys that default",
        "to another key (`train-iters`: `lr-decay-iters`) are filled in before these checks; the loaded config is",
        "read-only (in code, `cfg.replace(key=value)` gives a changed, checked copy).",
        "",
    ]
    for name, cls in SECTIONS.items():
        lines += [
            f"## {name}",
            "",
            (cls.__doc__ or "").strip(),
            "",
            "| key | default | effect | description |",
            "| --- | --- | --- | --- |",
        ]
        for f in dataclasses.fields(cls):
            key = f.name.replace("_", "-")
            aliases = f.metadata.get("aliases", ())
            if aliases:
                key += " (alias " + ", ".join(a.replace("_", "-") for a in aliases) + ")"
            doc = f.metadata["doc"].replace("|", "\\|")
            lines.append(f"| `{key}` | {_default(f)} | {f.metadata['effect']} | {doc} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
