"""MkDocs hook: the CLI reference page is generated from llmq's own argument parser (llmq.cli.build_parser), so
the documented flags and defaults cannot disagree with the code. A page holding `<!-- cli-reference -->` gets one
section per command, one table per group of flags."""

from __future__ import annotations

import argparse

MARKER = "<!-- cli-reference -->"


def _flags(action: argparse.Action) -> str:
    names = action.option_strings or [action.dest.upper() if action.metavar is None else str(action.metavar)]
    return ", ".join(f"`{name}`" for name in names)


def _default(action: argparse.Action) -> str:
    if not action.option_strings:
        return "required" if action.nargs is None else "optional"
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return "off" if action.default in (False, None) else "on"
    if isinstance(action, argparse.BooleanOptionalAction):
        return "on" if action.default else "off"
    if action.default is None:
        return "-"
    return f"`{action.default}`"


def _cell(text: str | None) -> str:
    return (text or "").replace("|", "\\|").replace("\n", " ")


def command_reference() -> str:
    from llmq.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = []
    for name, sub in subparsers.choices.items():
        out.append(f"## `llmq {name}`\n")
        out.append(f"```text\n{sub.format_usage().strip()}\n```\n")
        for group in sub._action_groups:
            actions = [a for a in group._group_actions if not isinstance(a, argparse._HelpAction)]
            if not actions:
                continue
            title = {"positional arguments": "arguments", "options": "options"}.get(group.title, group.title)
            out.append(f"### {title}\n\n| flag | default | meaning |\n|---|---|---|")
            for action in actions:
                out.append(f"| {_flags(action)} | {_default(action)} | {_cell(action.help)} |")
            out.append("")
    return "\n".join(out)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, command_reference())
