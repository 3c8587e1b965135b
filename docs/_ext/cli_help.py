"""``.. cli-help:: COMMAND``: the ``--help`` text of an ``ipmcondense`` subcommand, rendered at build time.

The text comes from the same argparse parser the command line uses, so the reference cannot drift
from the options that exist. ``.. cli-help::`` without an argument renders the top-level help.
"""

from __future__ import annotations

import os

from docutils import nodes
from docutils.parsers.rst import Directive


class CliHelp(Directive):
    optional_arguments = 1

    def run(self):
        from ipmcondense.cli import build_parser

        os.environ.setdefault("COLUMNS", "100")
        parser = build_parser()
        if self.arguments:
            name = self.arguments[0]
            sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
            if name not in sub.choices:
                raise self.error(f"unknown ipmcondense command {name!r}; expected one of {sorted(sub.choices)}")
            parser = sub.choices[name]
        text = parser.format_help()
        block = nodes.literal_block(text, text)
        block["language"] = "text"
        return [block]


def setup(app):
    app.add_directive("cli-help", CliHelp)
    return {"version": "1", "parallel_read_safe": True}
