#!/usr/bin/env python
"""Django's command-line utility for TEI Manager. `--config FILE` selects the TOML config
for any command (the same as TEI_MANAGER_CONFIG=FILE)."""

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "teimanager.settings")
    argv = take_config_option(sys.argv, os.environ)
    from django.core.management import execute_from_command_line

    execute_from_command_line(argv)


def take_config_option(argv: list[str], env: "os._Environ[str] | dict[str, str]") -> list[str]:
    """Remove `--config FILE` / `--config=FILE` from argv and put FILE in TEI_MANAGER_CONFIG."""
    rest: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == "--config":
            value = next(args, "")
            if not value:
                sys.stderr.write("--config needs a file name\n")
                raise SystemExit(2)
            env["TEI_MANAGER_CONFIG"] = value
        elif arg.startswith("--config="):
            env["TEI_MANAGER_CONFIG"] = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return rest


if __name__ == "__main__":
    main()
