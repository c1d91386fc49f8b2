"""Render one BPF C template with the build-time datapath shape.

Run by CMake at build time (``python render.py TEMPLATE OUTPUT --config
bpf/datapath.toml``), before ciliate itself is installed, so this module
imports nothing from the package: Jinja2 and the standard library only.
Templates shape structure (map sizes, array lengths, features); per-node
values are .rodata, written at load time.
"""

from __future__ import annotations

import argparse
import os
import sys
import tomllib
from pathlib import Path

import jinja2


def render(template: Path, config: Path) -> str:
    with config.open("rb") as f:
        context = tomllib.load(f)
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(template.parent),
        undefined=jinja2.StrictUndefined,  # a misspelt parameter is a build error
        keep_trailing_newline=True,
        # No trim_blocks: a line holding only a block tag renders as an empty
        # line, so compiler and verifier line numbers match the template.
    )
    return env.get_template(template.name).render(**context)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("template", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--config", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        text = render(args.template, args.config)
    except jinja2.TemplateError as exc:
        print(f"{args.template}: {exc}", file=sys.stderr)
        return 1
    # Write only on change, so an unchanged render does not recompile.
    if args.output.exists() and args.output.read_text() == text:
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_suffix(args.output.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
