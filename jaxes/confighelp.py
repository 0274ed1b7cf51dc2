"""Config files as the command line sees them: the fields of one, and what an override misses.

Used by ``jaxes.main`` for ``--help`` (every field of the chosen config with its default) and for
an unknown ``--config.a.b.c=...`` (its full path and the fields that do exist there).
"""

from __future__ import annotations

import json
from pathlib import Path

from ml_collections import config_dict
from ml_collections.config_flags import config_flags

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits.py"


def load(spec: str) -> config_dict.ConfigDict | None:
    """Loads ``FILE[:VARIANT]`` as ``--config`` would; None when it cannot be loaded."""
    try:
        config = config_flags.ConfigFileFlagParser("config", lock_config=False).parse(spec)
        config.to_dict()  # a file that failed to load raises only on use
    except Exception:  # any failure means "no config to describe"
        return None
    return config


def config_spec(argv: list[str]) -> str | None:
    """The value of ``--config=...`` in ``argv`` (the last one wins, as in absl)."""
    spec = None
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            spec = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            spec = argv[i + 1]
    return spec


def fields(config) -> list[tuple[str, object]]:
    """Every leaf field of ``config`` as (dotted path, default), in declaration order."""
    rows = []

    def walk(node, prefix):
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else key
            if isinstance(value, config_dict.ConfigDict):
                walk(value, path)
            else:
                rows.append((path, value))

    walk(config, "")
    return rows


def unknown_field(config, argv: list[str]) -> str | None:
    """One sentence for the first ``--config.PATH=`` override that ``config`` has no field for."""
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        path = arg[len("--config.") :].split("=", 1)[0]
        node, walked = config, []
        for part in path.split("."):
            if not isinstance(node, config_dict.ConfigDict) or part not in node:
                where = ".".join(["config", *walked])
                if isinstance(node, config_dict.ConfigDict):
                    valid = ", ".join(sorted(node.keys()))
                    return f"the config has no field config.{path}; {where} has {valid}."
                return f"the config has no field config.{path}; {where} is a value, not a group."
            node, walked = node[part], [*walked, part]
    return None


def _show(value) -> str:
    if isinstance(value, tuple | list):
        return json.dumps(list(value))
    return "None" if value is None else repr(value)


def help_text(doc: str, flag_lines: list[str], argv: list[str]) -> str:
    """The ``--help`` text: the command's doc, its flags, and the chosen config's fields."""
    spec = config_spec(argv) or (str(DEFAULT_CONFIG) if DEFAULT_CONFIG.exists() else None)
    lines = [doc.strip(), "", "Flags:", *flag_lines, ""]
    config = load(spec) if spec else None
    if config is None:
        lines.append("Give --config=FILE[:VARIANT] with --help to list that config's fields.")
    else:
        lines.append(f"Config fields of {spec} (set one with --config.FIELD=VALUE), defaults:")
        lines += [f"  {path} = {_show(value)}" for path, value in fields(config)]
    return "\n".join(lines)
