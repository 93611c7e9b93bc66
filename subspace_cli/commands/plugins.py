"""``subspace plugins``: the installed model and data plugins."""

from __future__ import annotations

import click

from subspace_cli.commands.common import examples, output_options


@click.command(
    "plugins",
    epilog=examples("""  subspace plugins
  subspace plugins --group models --json"""),
)
@click.option(
    "--group", "group", type=click.Choice(["models", "data"]), help="Only this entry-point group."
)
@click.option("--no-load", is_flag=True, help="Do not import plugins to check that they load.")
@output_options
def plugins_command(group: str | None, no_load: bool, as_json: bool) -> None:
    """List model and data plugins registered through entry points.

    Each plugin is imported to check that it loads (unless --no-load); a
    plugin that fails is listed with the reason, and the others still work.
    """
    from subspace_cli.errors import PluginError
    from subspace_cli.output import emit_json, emit_table
    from subspace_cli.plugins import DATA_GROUP, MODEL_GROUP, discover, load_plugin

    groups = {"models": [MODEL_GROUP], "data": [DATA_GROUP], None: [MODEL_GROUP, DATA_GROUP]}[group]
    rows = []
    for g in groups:
        for info in discover(g).values():
            status, error = None, None
            if not no_load:
                try:
                    load_plugin(info)
                    status = True
                except PluginError as exc:
                    status, error = False, str(exc)
            rows.append(
                {
                    "name": info.name,
                    "group": info.group,
                    "distribution": info.distribution,
                    "version": info.version,
                    "entry_point": info.value,
                    "loads": status,
                    "error": error,
                }
            )
    if as_json:
        emit_json(rows)
        return
    loads = {True: "yes", False: "NO", None: "not checked"}
    emit_table(
        [[r["name"], r["group"], r["distribution"], r["version"], loads[r["loads"]]] for r in rows],
        headers=["name", "group", "distribution", "version", "loads"],
    )
    for r in rows:
        if r["error"]:
            click.echo(f"warning: {r['error']}", err=True)
